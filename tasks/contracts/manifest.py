"""A stage's manifest, and what its build function hands back: the data every stage and flow passes on.

Pure data, no I/O: writing, verifying and reusing outputs is tasks/runtime/stage_output.py's. The
per-stage infos (tasks/contracts/stage_infos.py) build on `StageInfo` here, so the manifest and
the infos it carries import one way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field


class StageInfo(BaseModel):
    """What one stage publishes in its manifest's `info`; each stage's own is in stage_infos.py."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def of(cls, manifest: Manifest) -> Self:
        """The info of a manifest written by this stage."""
        return cls.model_validate(manifest.info)


class StageResult(BaseModel):
    """What a stage's build function hands back: its metrics and stage-specific facts."""

    metrics: dict[str, float] = Field(default_factory=dict)
    info: StageInfo | None = None  # written into the manifest; read back with e.g. TrainInfo.of(manifest)


class Manifest(BaseModel):
    """A finished stage output: small, JSON-able, and enough to verify and reuse it."""

    stage: str
    key: str
    output_dir: str
    files: dict[str, str] = Field(description="relative path -> sha256")
    metrics: dict[str, float] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    created_at: float = 0.0
    duration_s: float = Field(0.0, description="how long building the output took")
    reused: bool = False
    elapsed_s: float = Field(0.0, description="time this run spent on the stage (set on return)")

    @property
    def path(self) -> Path:
        return Path(self.output_dir)

    def digest(self) -> str:
        """Content identity of the output, used in downstream cache keys."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()[:16]
