"""What each stage publishes in its manifest's `info`: one pydantic model per stage, read by attribute.

A stage's build function returns its info as one of these (each a `StageInfo`, from
tasks/contracts/manifest.py); `run_stage` writes it into the manifest as JSON. A later stage (or the
lineage, or the command line) reads it back with `TrainInfo.of(manifest)`, which validates it, so a
renamed field fails where it is read, naming it, not as a KeyError deep in another stage.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tasks.contracts.manifest import Manifest, StageInfo
from tasks.contracts.worker_configs import QuantizedBase, Weights


class SourceRecord(StageInfo):
    """A dataset's identity for cache keys and lineage: its name, where it is, and a digest of the data."""

    name: str
    kind: str  # file, script, hf_hub, ms_hub, om_hub or cloud
    file: str  # the path, or the hub id or URL
    sha256: str  # of the file or folder; of what names a remote dataset
    subset: str | None = None
    split: str | None = None
    folder: str | None = None
    revision: str | None = None
    num_samples: int | None = None
    rows: int | None = None  # set once the template stage has read it
    skipped: int | None = None  # rows left out by dataset.on_bad_row: skip


class ModelInfo(StageInfo):
    model_path: str  # relative to the stage's output when the model lives inside it
    name_or_path: str
    source_digest: str
    architecture: str
    trust_remote_code: bool = False
    base_version: str = ""  # MODEL/VERSION a registry reference (`MODEL@champion`) named when the stage ran

    @classmethod
    def base_model_path(cls, manifest: Manifest) -> Path:
        """The model directory a model stage's manifest points to (inside its output, or the user's own)."""
        return manifest.path / cls.of(manifest).model_path


class TemplateInfo(StageInfo):
    sources: list[SourceRecord]
    template_vars: dict[str, str]
    templated_digest: str
    kind: str
    skipped: dict[str, int] = Field(default_factory=dict)  # "dataset: reason" -> rows


class TokenizeInfo(StageInfo):
    tokenized_digest: str
    kind: str
    cutoff_len: int


class RankSummary(StageInfo):
    """With several training processes: where each one ended."""

    rank: int
    steps: int
    examples: int
    weights: str | None  # a digest of its final weights, where each process holds them all


class TrainInfo(StageInfo):
    checkpoint_name: str
    stage: str
    finetuning_type: str
    weights: Weights  # what later stages load: a model directory and adapters to put on it
    quantized_base: QuantizedBase | None = None  # qlora: the base its adapter trained on, as bitsandbytes held it
    trainable_params: int | None = None
    total_params: int | None = None
    resumed_from_step: int | None = None
    ranks: list[RankSummary] | None = None
    reward_model_dir: str | None = None  # rm: the merged scoring model a ppo stage reads


class EvaluateInfo(StageInfo):
    eval_set_digest: str


class ExportInfo(StageInfo):
    model_dir: str  # relative to the stage's output
    gguf_file: str | None = None  # relative to model_dir, with export.formats: [safetensors, gguf]
    registered_model: str | None = None  # set once registered in MLflow
    version: str | None = None
    alias: str | None = None
