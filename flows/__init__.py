"""tunefactory's Prefect flows, the pipeline spec and the command line."""

import os

# Prefect's ephemeral server gets 20 s to start by default; on a busy 2-core machine that is
# not always enough, and a run that fails before its first stage helps nobody.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Nothing phones home: the default setup runs without a network.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
