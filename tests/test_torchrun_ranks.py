"""Every torchrun rank dies with the stage: kill -9 of the flow process that launched torchrun
leaves no rank running (they run in sessions of their own, out of reach of a process-group stop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from loopback import wait_for

TESTS = Path(__file__).resolve().parent
LAUNCH = """
import sys
from pathlib import Path
from tasks.contracts.child_process import run_worker
run_worker("rank_that_naps", None, Path(sys.argv[1]), torchrun=["--standalone", "--nproc-per-node", "2"])
"""


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's bookkeeping is left


def test_kill_9_of_the_flow_process_leaves_no_torchrun_rank_running(tmp_path: Path):
    pids = tmp_path / "pids"
    pids.mkdir()
    config = tmp_path / "nap.json"
    config.write_text(f'{{"pids_dir": "{pids}"}}')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    flow = subprocess.Popen([sys.executable, "-c", LAUNCH, str(config)], env=env, start_new_session=True)
    try:
        wait_for(lambda: len(list(pids.iterdir())) == 2, 120, "the two ranks to start")
        ranks = [int(path.read_text()) for path in pids.iterdir()]
        assert all(running(pid) for pid in ranks)
        flow.send_signal(signal.SIGKILL)  # the flow process only: no chance to stop anything
        flow.wait()
        wait_for(lambda: not any(running(pid) for pid in ranks), 30, f"ranks {ranks} to die with the flow process")
    finally:
        flow.kill()
        for path in pids.iterdir():
            if running(pid := int(path.read_text())):
                os.kill(pid, signal.SIGKILL)
