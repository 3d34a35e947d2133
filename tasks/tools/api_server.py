"""`tunefactory api MODEL`: an OpenAI-compatible HTTP endpoint over a model tunefactory made.

The server is transformers' own (`transformers serve`: FastAPI, `/v1/chat/completions` with
and without streaming, `/v1/completions`, `/v1/models`, `/health`), loaded with the one model
and the model's own chat template and generation config. tunefactory adds what it lacks:

- MODEL may be an export directory, a training stage's output or an adapter directory (merged
  onto its base into a temporary directory first: transformers serve loads whole models only),
  or a registry reference (`NAME`, `NAME/VERSION`, `NAME@ALIAS`) resolved through the
  workspace's MLflow;
- an API key (`--api-key`, or TUNEFACTORY_API_KEY): when set, every `/v1/` request must carry
  `Authorization: Bearer KEY`, or gets OpenAI's 401 error body;
- any `model` a request names is the one model served (transformers serve would refuse all but
  the model's path);
- a port in use, or a reference that does not resolve, is a one-line message before any
  weights are loaded.

Loopback by default; Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from tasks.dataset.registry import DataError
from tasks.runtime.model_registry import RegistryError
from tasks.tools.chat import resolve_chat_model

API_KEY_ENV = "TUNEFACTORY_API_KEY"


class ApiError(RuntimeError):
    """A model reference or a server setting the API cannot use; the message says which."""


def model_directories(reference: str, workspace: Path) -> tuple[Path, Path | None]:
    """(model directory, adapter directory or None) for MODEL as given on the command line."""
    path = Path(reference).expanduser()
    if path.exists():
        return resolve_chat_model(path)
    if not reference or reference.startswith((".", "/", "~")):
        raise DataError(f"{reference}: no such model directory")
    from mlflow.utils.file_utils import local_file_uri_to_path

    from tasks.runtime.model_registry import registry_client, resolve_version
    from tasks.runtime.tracking import tracking_uri

    uri = tracking_uri(workspace.resolve())
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise RegistryError(f"{reference}: no such directory, and {workspace} has no model registry (no mlflow.db)")
    try:
        version = resolve_version(registry_client(workspace), reference)
    except RegistryError as exc:
        raise RegistryError(f"{exc} (registry of {workspace}; no directory of that name either)") from None
    if urlparse(version.source).scheme not in ("", "file"):
        where = version.source
        raise RegistryError(f"{reference}: version {version.version} is stored at {where}, not on this machine")
    return resolve_chat_model(local_file_uri_to_path(version.source))


def merged_model(model_dir: Path, adapter: Path, into: Path) -> Path:
    """The adapter merged onto its base, saved in `into` with the adapter's tokenizer (or the base's)."""
    import torch
    from transformers import AutoTokenizer

    from tasks.components.modeling import load_model

    model = load_model(model_dir, adapter, "cpu", torch.float32, merge_all=True)
    model.save_pretrained(into)
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").exists() else model_dir
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(into)
    if (model_dir / "generation_config.json").exists() and not (into / "generation_config.json").exists():
        (into / "generation_config.json").write_bytes((model_dir / "generation_config.json").read_bytes())
    return into


class OneModelGate:
    """ASGI middleware in front of transformers serve, for what it lacks.

    - With a key set, a `/v1/` request without `Authorization: Bearer KEY` gets OpenAI's 401 body.
    - transformers serve pinned to one model refuses any other `model` in a request (and names
      it by its path); here the one model answers whatever a request names, as llama.cpp's
      server does, so `"model": "self-cognition"` works.
    """

    def __init__(self, app, api_key: str | None, served: str):
        self.app, self.served = app, served
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        if self.expected and not hmac.compare_digest(given, self.expected):
            body = {
                "error": {
                    "message": "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            return None
        if scope["method"] == "POST":
            receive = await self._with_served_model(receive)
        return await self.app(scope, receive, send)

    async def _with_served_model(self, receive):
        chunks, message = [], {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client went away: hand that on
                return _replay([message])
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        try:
            request = json.loads(body)
        except ValueError:  # not JSON: transformers' server answers it
            request = None
        if isinstance(request, dict) and "model" in request:
            body = json.dumps({**request, "model": self.served}).encode()
        return _replay([{"type": "http.request", "body": body, "more_body": False}])


def _replay(messages: list[dict]):
    """An ASGI receive that hands out `messages`, then waits as the server's own would."""
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # uvicorn's receive blocks until disconnect; so does this

    return receive


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise ApiError(f"port {port} on {host} is in use: choose another with --port") from None


@contextlib.contextmanager
def _gated_uvicorn(api_key: str | None, served: str):
    """transformers serve builds its app and hands it to `uvicorn.Config` in one call: the one
    place to put the gate in front of every route, its own included."""
    import uvicorn

    config = uvicorn.Config
    uvicorn.Config = lambda app, **options: config(OneModelGate(app, api_key, served), **options)
    try:
        yield
    finally:
        uvicorn.Config = config


def serve_api(reference: str, workspace: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None):
    """Serve MODEL until Ctrl-C or SIGTERM (uvicorn's signal handling); a merged copy is deleted then."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ApiError("transformers' server is not installed: `make install` (transformers[serving])")
    check_port_free(host, port)
    model_dir, adapter = model_directories(reference, Path(workspace))
    with contextlib.ExitStack() as scratch:
        if adapter is not None:
            merged = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="tunefactory-api-")))
            print(f"tunefactory: merging {adapter} onto {model_dir} to serve it", flush=True)
            model_dir = merged_model(model_dir, adapter, merged)
        from transformers.cli.serve import Serve

        key_note = " (API key required)" if api_key else ""
        print(f"tunefactory: serving {model_dir} at http://{host}:{port}/v1{key_note}", flush=True)
        # uvicorn stops on SIGINT or SIGTERM, then raises the signal again for the handler that was
        # there before: for SIGTERM too that is KeyboardInterrupt, so the merged copy is deleted
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            with _gated_uvicorn(api_key, str(model_dir)):
                # only the arguments every 5.x Serve takes: the rest of its Python API changes between releases
                Serve(force_model=str(model_dir), host=host, port=port)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
    print("tunefactory: the API server stopped", flush=True)
