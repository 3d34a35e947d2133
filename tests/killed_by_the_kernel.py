"""A stand-in worker for tests/test_memory_failures.py: `python -m killed_by_the_kernel COUNTER`
dies by SIGKILL, first adding one to the stand-in for /proc/vmstat's oom_kill counter in COUNTER
unless it holds `quiet`, as the kernel does when its out-of-memory killer picks a process."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

counter = Path(sys.argv[1])
kills = counter.read_text().split()
if kills[0] != "quiet":
    counter.write_text(f"oom_kill {int(kills[1]) + 1}\n")
os.kill(os.getpid(), signal.SIGKILL)
