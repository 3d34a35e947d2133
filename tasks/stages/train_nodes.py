"""Training across machines: node 0 is the train task, the others join it with `tunefactory train-node`.

With `train.nnodes` N, the train task (on node 0) writes `<workspace>/distributed/train-node.json`
naming the worker's config and how to launch it, then starts its own torchrun as node 0.
On each other machine, `tunefactory train-node --workspace W --node-rank K` (K = 1 .. N-1),
started by a Kubernetes indexed Job, a Ray task or by hand, waits for that file, starts the
same torchrun as node K, and exits with the training. The workspace must be one shared
filesystem: every process reads the tokenized data from it and writes its checkpoint part there.
Node ranks are fixed (torchrun's static rendezvous at `train.rendezvous` on node 0), so
process 0, which reports progress and writes the outputs, is always in the train task.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tasks.contracts.worker_configs import TrainingNotice

ANNOUNCEMENT = Path("distributed") / "train-node.json"


class JoinError(RuntimeError):
    """No training to join: a message for the person who started the node."""


def torchrun_arguments(
    num_processes: int, nnodes: int, rendezvous: str | None, node_rank: int, distributed: str = "ddp"
) -> list[str] | None:
    """torchrun's arguments for one node, or None for a single process that needs no process group
    (fsdp and deepspeed need one, even of one process)."""
    if num_processes * nnodes == 1 and distributed == "ddp":
        return None
    per_node = ["--nproc-per-node", str(num_processes)]
    if nnodes == 1:
        return ["--standalone", *per_node]
    assert rendezvous is not None  # the spec requires it with nnodes > 1
    host, port = rendezvous.rsplit(":", 1)
    # fixed node ranks: node 0, where the train task runs, holds process 0, which reports to it
    return [*per_node, "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", host,
            "--master-port", port]  # fmt: skip


def announce_training(workspace: Path, worker_config: Path, num_processes: int, nnodes: int, rendezvous: str) -> None:
    """Tell the other nodes what to run: written atomically, read by `join_training`."""
    path = workspace / ANNOUNCEMENT
    path.parent.mkdir(parents=True, exist_ok=True)
    notice = TrainingNotice(worker_config=str(worker_config), num_processes=num_processes, nnodes=nnodes,
                            rendezvous=rendezvous)  # fmt: skip
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(notice.model_dump_json(indent=2))
    os.replace(partial, path)


def waiting_training(workspace: Path) -> TrainingNotice | None:
    """The announced training if it is still to be done (its stage has not finished), else None."""
    try:
        notice = TrainingNotice.model_validate_json((workspace / ANNOUNCEMENT).read_bytes())
    except (OSError, ValueError):  # none yet, or not one (pydantic's ValidationError is a ValueError)
        return None
    # a finished stage's directory is renamed from its partial name: its worker config is gone
    return notice if Path(notice.worker_config).is_file() else None


def join_training(workspace: Path, node_rank: int, timeout: float, poll: float = 1.0) -> None:
    """Wait up to `timeout` seconds for a training to be announced, then run this node's share of it."""
    from tasks.contracts.child_process import run_worker

    deadline = time.monotonic() + timeout
    notice = waiting_training(workspace)
    while notice is None:
        if time.monotonic() > deadline:
            raise JoinError(
                f"no training waiting for nodes in {workspace} after {timeout:.0f}s: start a pipeline whose "
                "train section sets nnodes, with this workspace shared"
            )
        time.sleep(poll)
        notice = waiting_training(workspace)
    if not 1 <= node_rank < notice.nnodes:
        raise JoinError(f"--node-rank {node_rank}: the training has nodes 0..{notice.nnodes - 1}, and 0 is its own")
    print(f"tunefactory: node {node_rank} of {notice.nnodes} joining at {notice.rendezvous}", file=sys.stderr)
    run_worker(
        "tasks.workers.train",
        None,  # node 0 wrote it
        Path(notice.worker_config),
        # process 0, on node 0, reports: this node's events are not read
        torchrun=torchrun_arguments(notice.num_processes, notice.nnodes, notice.rendezvous, node_rank),
    )
