"""What the flows return, typed: the command line, the sweep and the tests read these by attribute.

A flow's return value is pickled by Prefect when it persists results, so these are plain pydantic
models of JSON-able fields: no client, no open file, no model object.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.contracts.manifest import Manifest
from tasks.runtime.tracking import Tracking
from tasks.stages.promotion import Promotion


class PipelineResult(BaseModel):
    """One pipeline run (`finetune` or `prepare`): its Prefect flow run, its MLflow run, each stage's manifest."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str
    tracking: Tracking
    stages: dict[str, Manifest]  # by stage id, in the order they ran: "model", "template", "train-reward", ...
    promotion: Promotion | None = None  # with export.promote: what the run did to the champion alias


class ComparisonFiles(BaseModel):
    """The files a comparison writes; printed in this order."""

    model_config = ConfigDict(frozen=True)

    csv: str
    markdown: str
    png: str


class ComparisonResult(BaseModel):
    """The compare flow's table (one row per run, keyed by column name) and its files."""

    model_config = ConfigDict(frozen=True)

    rows: list[dict[str, Any]]
    files: ComparisonFiles


class VariantOutcome(BaseModel):
    """One variant of a sweep: its label, how its flow run ended, and its pipeline result if it completed."""

    model_config = ConfigDict(frozen=True)

    label: str
    state: str  # the Prefect state's name: "Completed", "Failed", "Crashed", ...
    pipeline: PipelineResult | None = None


class SweepResult(BaseModel):
    """A sweep: every variant's outcome, and the comparison of those that completed (None if none did)."""

    model_config = ConfigDict(frozen=True)

    sweep_flow_run_id: str
    grid: dict[str, list[str]]
    variants: list[VariantOutcome]
    comparison: ComparisonResult | None = None
