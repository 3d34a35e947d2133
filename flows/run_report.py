"""What the command line prints when a flow run ends: the stages, the evaluation before and after,
where the model and the runs are, the time spent; a sweep's variants and their comparison; or,
when a run failed, how to continue it.

Everything printed here is also kept in logs: tracking and Prefect URIs are shown without credentials.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.contracts.stage_infos import ExportInfo
from tasks.runtime.redaction import redact_uri

if TYPE_CHECKING:
    from prefect.states import State

    from flows.results import ComparisonFiles, PipelineResult, SweepResult
    from tasks.contracts.manifest import Manifest
    from tasks.runtime.tracking import Tracking


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def stage_lines(stages: dict[str, Manifest]) -> list[str]:
    rows = [[name, "completed", "reused" if m.reused else "ran", f"{m.elapsed_s:.1f}s"] for name, m in stages.items()]
    return ["Stages", table(rows, ["stage", "status", "ran/reused", "duration"])]


def evaluation_lines(evaluated: Manifest | None) -> list[str]:
    """The headline metrics of the base and the tuned model side by side, each with its interval."""
    from tasks.runtime.intervals import interval_text, is_headline

    metrics = evaluated.metrics if evaluated else {}
    names = sorted({k.split("_", 1)[1] for k in metrics if k.startswith(("base_", "tuned_")) and is_headline(k)})
    if not names:
        return []

    def cell(key: str) -> str:
        interval = interval_text(metrics, key)
        return "-" if key not in metrics else f"{metrics[key]:.3f}" + (f" {interval}" if interval else "")

    rows = [[n, cell(f"base_{n}"), cell(f"tuned_{n}")] for n in names]
    header = ["metric", "base [95% interval] n", "tuned [95% interval] n"]
    return ["", "Evaluation (before -> after)", table(rows, header)]


def export_lines(exported: Manifest | None) -> list[str]:
    if exported is None:
        return []
    info = ExportInfo.of(exported)
    model_dir = Path(exported.output_dir) / info.model_dir
    return [
        "",
        f"Exported model: {model_dir}",
        f"  registered in MLflow as {info.registered_model} version {info.version} "
        f"(@{info.alias}); chat with it: tunefactory chat {model_dir}",
    ]


def where_lines(tracking: Tracking, flow_run_id: str, temporary_prefect: bool) -> list[str]:
    """Where to see the runs: the MLflow run, and the Prefect flow run unless its server is gone."""
    uri = redact_uri(tracking.uri)  # the summary is printed and kept in logs: no credentials
    lines = ["", f"MLflow run {tracking.parent_run_id} (experiment {tracking.experiment_id}):"]
    if uri.startswith("sqlite"):
        lines.append("  make ui   then open http://127.0.0.1:5000")
    else:
        lines.append(f"  {uri}/#/experiments/{tracking.experiment_id}/runs/{tracking.parent_run_id}")
    if os.environ.get("PREFECT_API_URL") and not temporary_prefect:
        ui = redact_uri(os.environ["PREFECT_API_URL"].removesuffix("/api"))
        lines.append(f"Prefect flow run: {ui}/runs/flow-run/{flow_run_id}")
    else:
        lines.append(
            f"Prefect flow run {flow_run_id}: in Prefect's local history (`prefect server start` shows it); "
            "start `make ui` first and later runs appear in its Prefect UI"
        )
    return lines


def summary(result: PipelineResult, temporary_prefect: bool = False) -> str:
    """The end-of-run report: stages, evaluation before and after, where the model and runs are."""
    return "\n".join(
        stage_lines(result.stages)
        + evaluation_lines(result.stages.get("evaluate"))
        + export_lines(result.stages.get("export"))
        + ([f"  {result.promotion.summary()}"] if result.promotion else [])
        + where_lines(result.tracking, result.flow_run_id, temporary_prefect)
    )


def time_report() -> str:
    """Wall time since this process started, split into model compute and orchestration."""
    import psutil

    from tasks.contracts.child_process import model_compute_seconds

    wall = time.time() - psutil.Process().create_time()
    compute = model_compute_seconds()
    return (
        f"Time: {wall:.1f}s in all; model compute {compute:.1f}s (training, evaluation and export workers, "
        f"model conversion); orchestration {wall - compute:.1f}s (start-up, Prefect, MLflow, stage bookkeeping)"
    )


def failure_report(state: State, flow_name: str) -> str:
    """Why a pipeline run did not complete, and the two ways to continue it at the failed stage."""
    flow_run_id = state.state_details.flow_run_id
    error = state.result(raise_on_failure=False)
    reason = str(error) if isinstance(error, BaseException) else state.message
    return (
        f"\ntunefactory: the pipeline run {flow_run_id} {state.name.lower()}: {reason}\n"
        "Finished stages are kept. To continue at the failed stage, run the same command again, or:\n"
        f"  prefect flow-run retry {flow_run_id} --entrypoint flows/pipeline.py:{flow_name}"
    )


def sweep_report(result: SweepResult) -> str:
    """Each variant with how its run ended."""
    return "\n" + table([[v.label, v.state] for v in result.variants], ["variant", "state"])


def print_comparison(files: ComparisonFiles) -> None:
    """The comparison table as written to its CSV, then where its files are."""
    import pandas as pd

    frame = pd.read_csv(files.csv, index_col="run").drop(columns=["run_id"])
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print("\n" + frame.to_string(float_format=lambda v: f"{v:.4g}"))
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in files.model_dump().items()))
