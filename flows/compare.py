"""Compare pipeline runs as a Prefect flow: the table and the picture become artifacts.

`tunefactory compare` runs the same comparison without Prefect; the sweep flow ends with this.
"""

from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from tasks.runtime.prefect_artifacts import publish_comparison
from tasks.runtime.tracking import tracking_uri
from tasks.tools.compare_runs import pipeline_runs, write_comparison


def comparison_dir(workspace: Path, name: str) -> Path:
    return workspace / "comparisons" / name


def run_comparison(
    workspace: Path, experiment: str | None, run_ids: list[str] | None, last: int, out: Path
) -> tuple[Any, dict[str, Path]]:
    client = MlflowClient(tracking_uri=tracking_uri(workspace))
    return write_comparison(client, pipeline_runs(client, experiment, run_ids, last), out)


@flow(name="compare", flow_run_name="compare {experiment}")
def compare(
    workspace: str, experiment: str, run_ids: list[str] | None = None, last: int = 5, out: str | None = None
) -> dict[str, Any]:
    """Table and plot of the given runs (or the latest `last` of the experiment), as artifacts."""
    root = Path(workspace).resolve()
    target = Path(out) if out else comparison_dir(root, experiment)
    table, paths = run_comparison(root, experiment, run_ids, last, target)
    get_run_logger().info("comparison of %d runs:\n%s", len(table), table.drop(columns=["run_id"]).to_string())
    rows = table.reset_index().to_dict(orient="records")
    publish_comparison(rows, paths["png"], f"{experiment}: {len(rows)} runs compared")
    return {"rows": rows, "paths": {k: str(v) for k, v in paths.items()}}
