"""Time tiny pipelines (tests/tiny_pipeline.py: every stage on a 2-layer model) one after the other in
one flow process, each in a new workspace: the figure for how much of a short run is start-up.

    .venv/bin/python tests/time_tiny_pipelines.py --runs 3           # workers forked from the preloaded parent
    .venv/bin/python tests/time_tiny_pipelines.py --runs 3 --cold    # every worker a fresh `python -m`
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny_pipeline import build_tiny_llama, tiny_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="TUNEFACTORY_PRELOADED_WORKERS=0")
    args = parser.parse_args()
    if args.cold:
        os.environ["TUNEFACTORY_PRELOADED_WORKERS"] = "0"
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import finetune

    logging.getLogger("prefect").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="tiny-timing-"))
    model = build_tiny_llama(root / "tiny-llama")
    with prefect_test_harness(server_startup_timeout=120):
        for run in range(args.runs):
            started = time.perf_counter()
            finetune(tiny_spec(model, root / f"workspace-{run}"))
            print(f"run {run + 1}: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
