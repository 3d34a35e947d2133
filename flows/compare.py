"""Compare pipeline runs as a Prefect flow: the table and the picture become artifacts.

`tunefactory compare` runs the same comparison without Prefect; the sweep flow ends with this.
"""

from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from flows.results import ComparisonFiles, ComparisonResult
from tasks.runtime.prefect_artifacts import publish_comparison
from tasks.runtime.tracking import tracking_uri
from tasks.tools.compare_runs import pipeline_runs, write_comparison


def comparison_dir(workspace: Path, name: str) -> Path:
    return workspace / "comparisons" / name


def run_comparison(
    workspace: Path, experiment: str | None, run_ids: list[str] | None, last: int, out: Path
) -> tuple[pd.DataFrame, ComparisonFiles]:
    client = MlflowClient(tracking_uri=tracking_uri(workspace))
    table, paths = write_comparison(client, pipeline_runs(client, experiment, run_ids, last), out)
    return table, ComparisonFiles(**{kind: str(path) for kind, path in paths.items()})


@flow(name="compare", flow_run_name="compare {experiment}")
def compare(
    workspace: str, experiment: str, run_ids: list[str] | None = None, last: int = 5, out: str | None = None
) -> ComparisonResult:
    """Table and plot of the given runs (or the latest `last` of the experiment), as artifacts."""
    root = Path(workspace).resolve()
    target = Path(out) if out else comparison_dir(root, experiment)
    table, files = run_comparison(root, experiment, run_ids, last, target)
    get_run_logger().info("comparison of %d runs:\n%s", len(table), table.drop(columns=["run_id"]).to_string())
    rows = table.reset_index().to_dict(orient="records")
    publish_comparison(rows, Path(files.png), f"{experiment}: {len(rows)} runs compared")
    return ComparisonResult(rows=rows, files=files)
