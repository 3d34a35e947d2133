"""What the tests that start servers and processes on this machine share: a free loopback port,
waiting for something to come up, and the headers a write to a guarded Prefect server needs."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def prefect_csrf_headers(api_url: str) -> dict[str, str]:
    """The headers a write to tunefactory's Prefect servers needs (CSRF protection is on there):
    a token fetched for a client id, as Prefect's UI and Python client do."""
    import uuid

    import httpx

    client = str(uuid.uuid4())
    response = httpx.get(f"{api_url}/csrf-token", params={"client": client}, timeout=30)
    response.raise_for_status()
    return {"Prefect-Csrf-Token": response.json()["token"], "Prefect-Csrf-Client": client}
