"""A stand-in worker for tests/test_preloaded_workers.py: `python -m worker_probe CONFIG` reports, as a
Note event, what it was started with (command line, folder, environment, affinity, process group,
whether torch was already imported), then does what CONFIG's `then` says: exit with a code, raise,
or sleep until it is killed."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel


class ProbeJob(BaseModel):
    then: str = "exit 0"  # "exit N", "raise" or "sleep"
    finetuning_type: str | None = None  # "qlora": a job that needs bitsandbytes, as a training job's config says


class LightProbeJob(ProbeJob):
    """A job whose worker loads none of the parent's libraries (as templating's): it never waits for the parent."""

    loads_model_libraries: ClassVar[bool] = False


def facts() -> dict:
    return {
        "argv": sys.argv[1:],
        "cmdline": Path("/proc/self/cmdline").read_bytes().decode().replace("\0", " ").strip(),
        "cwd": os.getcwd(),
        "probe_variable": os.environ.get("TUNEFACTORY_PROBE"),
        "affinity": sorted(os.sched_getaffinity(0)),
        "leads_its_session": os.getsid(0) == os.getpid() == os.getpgid(0),
        "stdin": sys.stdin.read(),
        "torch_preloaded": "torch" in sys.modules,
        "pid": os.getpid(),
        "parent": os.getppid(),
        # HF_HOME as huggingface_hub read it at its import (None: not imported yet, a cold start)
        "hf_home_at_import": getattr(sys.modules.get("huggingface_hub.constants"), "HF_HOME", None),
    }


if __name__ == "__main__":
    started = facts()  # before the imports below, which load no torch
    from tasks.contracts.child_process import emit
    from tasks.contracts.worker_events import Note

    job = ProbeJob.model_validate_json(Path(sys.argv[1]).read_bytes())
    emit(Note(message=json.dumps(started)))
    if job.then.startswith("exit"):
        sys.exit(int(job.then.split()[1]))
    if job.then == "raise":
        raise RuntimeError("the probe failed as asked")
    Path(sys.argv[1]).with_suffix(".asleep").touch()  # reported, and asleep: what a test may kill it after
    time.sleep(600)
