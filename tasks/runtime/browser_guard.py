"""Keep web pages of other origins away from the local Prefect and MLflow servers.

Prefect's defaults let any web page the user opens drive its API (CORS allows every origin,
CSRF protection is off), and MLflow's allow every page served from localhost, on any port, and
any private address as Host. While `tunefactory serve` or a worker runs, such a page could
create a flow run with a spec of its choosing (a hub repository with `trust_remote_code`: code
execution), or move a registry alias that `promote` and `api` trust. So every server
tunefactory starts (`ui start`'s two, a command's temporary Prefect server, `tunefactory api` on
loopback) runs its app behind `BrowserGuard`:

- a request whose Host header is not the loopback address it serves is refused: a page whose
  domain is rebound to 127.0.0.1 (DNS rebinding) is same-origin to the browser, and only the
  Host header tells it apart;
- a request whose Origin header is not the server's own is refused, preflights included:
  browsers send Origin on every cross-origin request and on same-origin writes, while the UI's
  own reads and Python clients send none or the server's own.

On Prefect, CORS is also restricted to its own origin and CSRF protection is on (a write needs
a token from `/api/csrf-token`; Prefect's UI and Python client fetch it themselves).
"""

from __future__ import annotations

import os

PORT = "TUNEFACTORY_GUARDED_PORT"
MLFLOW_APP_NAME = "tunefactory-guarded"  # the `mlflow.app` entry point in pyproject.toml
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def own_origins(port: int, names: tuple[str, ...] = LOOPBACK_NAMES) -> list[str]:
    return [f"http://{name}:{port}" for name in names]


def guard_environment(port: int) -> dict[str, str]:
    """The environment of a guarded server on loopback port `port` (Prefect reads its part)."""
    return {
        PORT: str(port),
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(own_origins(port)),
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
    }


class BrowserGuard:
    """ASGI middleware: 403 for a foreign Host or Origin header (see the module's docstring)."""

    def __init__(self, app, port: int, names: tuple[str, ...] = LOOPBACK_NAMES):
        """names: the server's own, as Host headers write them (`[::1]` for an IPv6 address)."""
        self.app = app
        self.hosts = {name.encode() for name in names} | {f"{name}:{port}".encode() for name in names}
        self.origins = {origin.encode() for origin in own_origins(port, names)}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers", []))
            origin = headers.get(b"origin")
            if headers.get(b"host") not in self.hosts:
                return await _refuse(scope, send, b"this server answers only on its loopback address")
            if origin is not None and origin not in self.origins:
                return await _refuse(scope, send, b"requests from pages of other origins are refused")
        await self.app(scope, receive, send)


async def _refuse(scope, send, why: bytes) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": why})


def _port() -> int:
    return int(os.environ[PORT])


def prefect_app():
    """Prefect's server app (uvicorn --factory), guarded; final / ephemeral as Prefect reads them
    from the environment."""
    from prefect.server.api.server import create_app

    return BrowserGuard(create_app(), _port())


def mlflow_app():
    """MLflow's tracking server app, guarded: `mlflow server --app-name tunefactory-guarded` finds
    it through this package's `mlflow.app` entry point and runs it with uvicorn --factory."""
    from mlflow.server.fastapi_app import app

    return BrowserGuard(app, _port())
