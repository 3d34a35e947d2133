"""A stand-in training rank for tests/test_torchrun_ranks.py: started by torchrun through the
workers' own entry point, it records its process id and sleeps."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

from tasks.contracts.child_process import worker_entry


class Nap(BaseModel):
    pids_dir: str


def main(config: Nap) -> None:
    Path(config.pids_dir, os.environ["RANK"]).write_text(str(os.getpid()))
    time.sleep(300)


if __name__ == "__main__":
    worker_entry(main, Nap)
