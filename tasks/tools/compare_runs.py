"""Pipeline runs side by side: the spec keys that differ, the metrics that matter, the curves.

`tunefactory compare` and the sweep flow both come here. Everything is read back from
MLflow: the parent run's params (the resolved spec, key by key) and headline metrics, and
the train stage's loss history (from the run that trained, when the stage was reused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tasks.runtime.intervals import interval_text
from tasks.runtime.tracking import PARENT_TAG, built_by

# the headline metrics, in table order, with how a person reads them; then every other set's and
# benchmark's (`headline_metrics`)
METRICS = {
    "tuned_identity_hit_rate": "identity hit rate",
    "tuned_control_accuracy": "control accuracy",
    "tuned_control_identity_leak": "identity leak",
    "tuned_val_loss": "val loss",
}
OTHER_SCORES = ("_accuracy", "_rouge_l", "_acc")  # a user's set or a benchmark, by how it is scored
# spec keys that differ between runs without changing what is trained
IGNORED_PARAMS = {"workspace", "dataset.preview_rows", "train.logging_steps", "train.checkpoint_name"}


class CompareError(ValueError):
    """Nothing to compare: no such experiment or runs."""


def pipeline_runs(
    client: MlflowClient, experiment: str | None = None, run_ids: list[str] | None = None, last: int = 5
) -> list[Run]:
    """The runs given by id, or the latest finished pipeline runs of an experiment (oldest first)."""
    if run_ids:
        return [client.get_run(run_id) for run_id in run_ids]
    found = client.get_experiment_by_name(experiment or "")
    if found is None:
        raise CompareError(f"no MLflow experiment named {experiment!r}: run the pipeline first")
    runs = client.search_runs(
        [found.experiment_id],
        "attributes.status = 'FINISHED' and tags.spec_digest != ''",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    runs = [run for run in runs if PARENT_TAG not in run.data.tags]
    if not runs:
        raise CompareError(f"experiment {experiment!r} has no finished pipeline run")
    return runs[::-1]


def stage_of(client: MlflowClient, pipeline: Run, stage: str) -> Run | None:
    """A pipeline's stage run, or the run that built the output it reused."""
    found = client.search_runs(
        [pipeline.info.experiment_id],
        f"tags.`{PARENT_TAG}` = '{pipeline.info.run_id}' and tags.stage = '{stage}'",
        max_results=1,
    )
    if not found:
        return None
    return built_by(client, found[0])


def run_label(run: Run) -> str:
    return f"{run.info.run_name or 'run'} ({run.info.run_id[:8]})"


def differing_params(runs: list[Run]) -> list[str]:
    keys = sorted({k for run in runs for k in run.data.params} - IGNORED_PARAMS)
    return [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]


def headline_metrics(runs: list[Run]) -> dict[str, str]:
    """METRICS, then the tuned model's score on each further set and benchmark any run has."""
    found = dict(METRICS)
    for metric in sorted({key for run in runs for key in run.data.metrics}):
        if metric.startswith("tuned_") and metric.endswith(OTHER_SCORES) and metric not in found:
            found[metric] = metric.removeprefix("tuned_").replace("_", " ")
    return found


def comparison_table(client: MlflowClient, runs: list[Run]) -> pd.DataFrame:
    """One row per run: the spec keys that differ, then the headline metrics, each followed by its
    95% interval and sample size where the run recorded them, then the training metrics."""
    columns = differing_params(runs)
    rows = []
    for run in runs:
        train = stage_of(client, run, "train")
        row: dict[str, Any] = {"run": run_label(run), "run_id": run.info.run_id}
        row.update({key: run.data.params.get(key) for key in columns})
        for metric, name in headline_metrics(runs).items():
            row[name] = run.data.metrics.get(metric)
            row[f"{name} 95%"] = interval_text(run.data.metrics, metric) or None
        row["final train loss"] = train.data.metrics.get("final_loss") if train else None
        row["train seconds"] = train.data.metrics.get("train_seconds") if train else None
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def loss_histories(client: MlflowClient, runs: list[Run]) -> dict[str, list[tuple[int, float]]]:
    histories = {}
    for run in runs:
        train = stage_of(client, run, "train")
        if train is not None:
            points = client.get_metric_history(train.info.run_id, "loss")
            histories[run_label(run)] = sorted((p.step, p.value) for p in points)
    return histories


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub table (pandas' own needs the optional `tabulate`)."""
    frame = table.drop(columns=["run_id"]).reset_index()

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def variant_names(table: pd.DataFrame, params: list[str]) -> dict[str, str]:
    """Short legend entries: the differing keys' values, else the run label."""
    names = {}
    for label, row in table.iterrows():
        parts = [f"{key.rsplit('.', 1)[-1]}={row[key]}" for key in params]
        names[label] = ", ".join(parts) or label
    return names


def plot_comparison(table: pd.DataFrame, histories: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Loss curves overlaid (left) and the evaluation metrics side by side (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    params = [c for c in table.columns if "." in c]
    names = variant_names(table, params)
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    for label, points in histories.items():
        if points:
            steps, losses = zip(*points, strict=True)
            curves.plot(steps, losses, marker=".", linewidth=1.5, label=names.get(label, label))
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("training loss (cross-entropy, nats per token)")
    curves.set_title("Training loss")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)

    shares = ["identity hit rate", "control accuracy", "identity leak"]
    width = 0.8 / max(len(table), 1)
    positions = np.arange(len(shares))
    for index, (label, row) in enumerate(table.iterrows()):
        values = [0.0 if pd.isna(row[m]) else row[m] for m in shares]
        drawn = bars.bar(positions + index * width - 0.4 + width / 2, values, width, label=names[label])
        bars.bar_label(drawn, fmt="%.2f", fontsize=7, padding=2)  # a zero bar is invisible otherwise
    bars.set_xticks(positions, shares)
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("share of held-out prompts (0-1)")
    bars.set_title("Evaluation of the tuned model")
    bars.grid(axis="y", alpha=0.3)
    bars.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(client: MlflowClient, runs: list[Run], out: Path) -> tuple[pd.DataFrame, dict[str, Path]]:
    """The table (printed by the caller), and comparison.csv / .md / .png under `out`."""
    table = comparison_table(client, runs)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "comparison.csv", "markdown": out / "comparison.md", "png": out / "comparison.png"}
    table.to_csv(paths["csv"])
    paths["markdown"].write_text(to_markdown(table))
    plot_comparison(table, loss_histories(client, runs), paths["png"])
    return table, paths
