"""Faults the tests ask a worker for, read once from the environment: for tests only.

A test sets `TUNEFACTORY_FAULT_*` (monkeypatch.setenv, or the environment of a command it starts) to
make a worker die or fail at a chosen point, then checks that the pipeline recovers or refuses as a
user would need it to. Unset, every fault is off and the workers behave as in production.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "TUNEFACTORY_FAULT_"
FAULT_MERGE_TWICE = f"{PREFIX}MERGE_ONE_MODULE_TWICE"


class Faults(BaseModel):
    """The faults asked for; 0 or False is none."""

    model_config = ConfigDict(frozen=True)

    # a training process SIGKILLs itself right after the checkpoint of this step (pt/sft: the process
    # of rank `kill_rank`; TRL's stages: the one process)
    kill_at_step: int = Field(0, alias=f"{PREFIX}KILL_AT_STEP")
    kill_rank: int = Field(0, alias=f"{PREFIX}KILL_RANK")
    # TRL's stages: SIGKILL inside the save of this step, before the checkpoint is complete (first attempt)
    kill_in_save_at_step: int = Field(0, alias=f"{PREFIX}KILL_IN_SAVE_AT_STEP")
    # pt/sft: a micro-batch of more than `oom_rows` examples at this step raises torch's OutOfMemoryError
    oom_at_step: int = Field(0, alias=f"{PREFIX}OOM_AT_STEP")
    oom_rows: int = Field(0, alias=f"{PREFIX}OOM_ROWS")
    # export: the merge applies one module's LoRA change twice, a wrong merge its check must catch
    merge_one_module_twice: bool = Field(False, alias=FAULT_MERGE_TWICE)

    @classmethod
    def from_environment(cls) -> Faults:
        return cls.model_validate({name: value for name, value in os.environ.items() if name.startswith(PREFIX)})
