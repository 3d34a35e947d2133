"""`tunefactory ui` trusts only the servers its workspace started: a process id recorded before a
reboot, another workspace's servers on the same ports and a damaged record are each handled
without signalling, reporting to or tracebacking on something that is not this workspace's."""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
from pathlib import Path

import pytest
from loopback import free_port

from flows.cli import main
from tasks.runtime import local_servers
from tasks.runtime.local_servers import RECORD, ServerError, Servers, process_identity


@pytest.fixture
def bystander():
    """A process of someone else's, in a session of its own (a process group `ui stop` could signal)."""
    process = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def record(workspace: Path, pids: dict[str, int], identities: dict[str, str | None], ports=(1, 2)) -> None:
    servers = Servers(
        prefect_url=f"http://127.0.0.1:{ports[0]}",
        mlflow_url=f"http://127.0.0.1:{ports[1]}",
        pids=pids,
        identities=identities,
    )
    (workspace / RECORD).write_text(servers.model_dump_json())


def test_ui_stop_leaves_alone_a_process_that_now_has_a_recorded_pid(tmp_path: Path, bystander, capsys):
    # a record from before a reboot: the pid is now another program's, started at another time
    pid = bystander.pid
    record(tmp_path, {"prefect": pid, "mlflow": pid}, {"prefect": "old-boot/123", "mlflow": "old-boot/123"})
    assert main(["ui", "stop", "--workspace", str(tmp_path)]) == 0
    assert "nothing was signalled" in capsys.readouterr().out
    time.sleep(0.5)
    assert bystander.poll() is None  # still running
    assert not (tmp_path / RECORD).exists()


def test_ui_stop_stops_the_process_it_started(tmp_path: Path, bystander, capsys):
    pid = bystander.pid
    record(tmp_path, {"prefect": pid}, {"prefect": process_identity(pid)})
    assert local_servers.is_ours(local_servers.recorded(tmp_path), "prefect")
    # reaped as soon as it ends, as init reaps the servers that `ui start` left behind
    threading.Thread(target=bystander.wait, daemon=True).start()
    assert main(["ui", "stop", "--workspace", str(tmp_path)]) == 0
    assert "stopped the prefect server" in capsys.readouterr().out
    assert bystander.wait(timeout=30) != 0


class Answering(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the standard library's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def foreign_servers():
    """Servers another workspace started: anything that answers 200 on the two ports."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tuple(server.server_address[1] for server in servers)
    for server in servers:
        server.shutdown()
        server.server_close()


def test_another_workspaces_servers_on_its_ports_are_not_taken_for_its_own(tmp_path: Path, foreign_servers, bystander):
    # this workspace's servers died (a stale record on the same ports); another's answer there now
    pid = bystander.pid
    record(tmp_path, {"prefect": pid, "mlflow": pid}, {"prefect": "gone/1", "mlflow": "gone/1"}, foreign_servers)
    assert local_servers.running(tmp_path) is None  # runs do not report to them
    with pytest.raises(ServerError, match=rf"port {foreign_servers[0]} .* in use by a program this workspace did not"):
        local_servers.start(tmp_path, prefect_port=foreign_servers[0], mlflow_port=free_port())
    assert bystander.poll() is None


@pytest.mark.parametrize("text", ['{"prefect_url": "http://127.0.0.1:4200"', "[]", '{"pids": "many"}', "\xff\xfe"])
def test_a_damaged_servers_record_is_a_message_naming_it(tmp_path: Path, text: str, capsys):
    (tmp_path / RECORD).write_bytes(text.encode("latin-1"))
    assert main(["ui", "stop", "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / RECORD) in err and "delete the file" in err
    assert "Traceback" not in err
