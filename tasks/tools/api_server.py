"""`tunefactory api MODEL`: an OpenAI-compatible HTTP endpoint over a model tunefactory made.

The server is transformers' own (`transformers serve`: FastAPI, `/v1/chat/completions` with
and without streaming, `/v1/completions`, `/v1/models`, `/health`), loaded with the one model
and the model's own chat template and generation config. tunefactory adds what it lacks, most of
it in a gate in front of every route:

- MODEL may be an export directory, a training stage's output or an adapter directory (merged
  onto its base, in the base's dtype, into a temporary directory first: transformers serve
  loads whole models only), or a registry reference (`NAME`, `NAME/VERSION`, `NAME@ALIAS`)
  resolved through the workspace's MLflow;
- it is served under one name (`--served-model-name`; by default the registry's name or the
  directory's), which `/v1/models` and every answer show, whatever `model` a request names;
- an API key (`--api-key`, or TUNEFACTORY_API_KEY): when set, every request but `/health` must
  carry `Authorization: Bearer KEY`, or gets OpenAI's 401 error body;
- routes other than `/v1/...`, `/health` and `/docs` are refused (403): transformers' model
  management (`/reset`, `/load_model`) has no use on a server of one model, and `/reset` takes no
  body, so any web page could send it;
- a request body is at most `--max-body-mb` (else 413) and a JSON object nested at most
  MAX_JSON_DEPTH deep (else 400), in OpenAI's error shape;
- on loopback, the project's browser guard (tasks/runtime/browser_guard.py) refuses a foreign
  Host or Origin header (403); any other address needs a key, or `--public-without-key`;
- before the server opens its socket, the app it serves is checked to be behind the gate: a
  transformers release that builds its server otherwise is refused, not served unguarded;
- a port in use, or a reference that does not resolve, is a one-line message before any
  weights are loaded.

Ctrl-C or SIGTERM stops it and deletes the merged copy; a copy left by a killed server is
deleted by the next one to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.dataset.registry import DataError
from tasks.runtime.answer_records import AnswerRecorder, Rating, RatingRefused, ServedVersion, answers_experiment
from tasks.runtime.browser_guard import LOOPBACK_NAMES, BrowserGuard
from tasks.runtime.local_servers import process_identity
from tasks.tools.answer_capture import RECORDED_ROUTES, capturing_send, new_completion_id, with_request_id
from tasks.tools.chat import resolve_chat_model

API_KEY_ENV = "TUNEFACTORY_API_KEY"
SCRATCH_PREFIX = "tunefactory-api-"  # the temporary directory of each server's copy
OWNER_FILE = "owner.json"
SERVED_PATHS = ("/health", "/docs", "/openapi.json")  # and every path under /v1/
RATINGS_PATH = "/v1/ratings"  # answered by the gate: the rating of a recorded answer
RATING_WAIT_S = 60.0  # a rating waits behind the answers queued before it, at most this long
MAX_JSON_DEPTH = 64  # OpenAI's requests nest a dozen deep at most (tool schemas included)
# a name that transformers serve takes as a local path relative to the copy's directory: one or two
# parts (`nova`, `acme/nova`), never `..`, `@` or `:` (its syntax for revisions and GGUF files)
SERVED_NAME = re.compile(r"\w[\w. -]*(/\w[\w. -]*)?")


class ApiError(RuntimeError):
    """A model reference or a server setting the API cannot use; the message says which."""


@dataclass(frozen=True)
class ApiOptions:
    """How `tunefactory api` serves; the command line documents each option."""

    host: str
    port: int
    api_key: str | None
    served_name: str | None
    max_body_mb: float
    public_without_key: bool
    record: bool = False  # keep every answer, and take ratings of them (tasks/runtime/answer_records.py)


class ServedModel(NamedTuple):
    model_dir: Path
    adapter: Path | None
    name: str  # its name by default: the registry's, or the directory's
    version: str = ""  # the registry's version number; "" for a directory served by path


def resolve_model(reference: str, workspace: Path) -> ServedModel:
    """The model directory, adapter directory or None, and default name of MODEL as given on the command line."""
    path = Path(reference).expanduser()
    if path.exists():
        return ServedModel(*resolve_chat_model(path), path.resolve().name)
    if not reference or reference.startswith((".", "/", "~")):
        raise DataError(f"{reference}: no such model directory")
    # here, not at the top: a server of a local directory starts without importing MLflow (4-7 s)
    from tasks.runtime.model_registry import RegistryError, version_directory

    try:
        directory, version = version_directory(reference, workspace)
    except RegistryError as exc:
        raise RegistryError(f"{exc}; no directory of that name either") from None
    return ServedModel(*resolve_chat_model(directory), version.name, str(version.version))


def model_directories(reference: str, workspace: Path) -> tuple[Path, Path | None]:
    """(model directory, adapter directory or None) for MODEL as given on the command line."""
    model = resolve_model(reference, workspace)
    return model.model_dir, model.adapter


def merged_model(model_dir: Path, adapter: Path, into: Path, dtype: str = "float32") -> Path:
    """The adapter merged onto its base, saved in `into` with the adapter's tokenizer (or the base's).

    dtype: the merged weights' ("auto": the base's own)."""
    from transformers import AutoTokenizer

    from tasks.components.modeling import load_model

    model = load_model(model_dir, adapter, "cpu", dtype, merge_all=True)
    model.save_pretrained(into)
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").exists() else model_dir
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(into)
    if (model_dir / "generation_config.json").exists() and not (into / "generation_config.json").exists():
        (into / "generation_config.json").write_bytes((model_dir / "generation_config.json").read_bytes())
    return into


class _Refused(Exception):
    """A request the gate answers itself, with OpenAI's error body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class OneModelGate:
    """ASGI middleware in front of transformers serve: the key, the routes, the body, the name (see the module)."""

    def __init__(
        self, app, served_name: str, api_key: str | None, max_body_bytes: int, recorder: AnswerRecorder | None = None
    ):
        self.app, self.served_name, self.max_body_bytes = app, served_name, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.recorder = recorder

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" or (scope["type"] == "http" and scope["path"] == "/health"):
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # transformers serves no websocket
            return await send({"type": "websocket.close", "code": 1008})
        try:
            self._check_route(scope)
            if scope["method"] == "POST":
                body = await _read_body(scope, receive, self.max_body_bytes)
                if body is None:  # the client left: nobody to answer
                    return None
                if scope["path"] == RATINGS_PATH:
                    return await _answer_json(send, await self._rate(_json_request(body)))
                receive = _body_then(self._with_served_name(body, scope), receive)
                if self.recorder is not None and scope["path"] in RECORDED_ROUTES:
                    scope, send = self._recording(scope, send, body)
        except _Refused as refusal:
            return await _answer_error(send, refusal)
        return await self.app(scope, receive, send)

    def _recording(self, scope, send, body: bytes):
        """The scope with a completion id of the gate's, and a send that records the answer once sent."""
        route = RECORDED_ROUTES[scope["path"]]
        completion_id = new_completion_id(route)
        request = _json_request(body)
        recorded_send = capturing_send(send, route, completion_id, request, self.recorder.record)
        return with_request_id(scope, completion_id), recorded_send

    async def _rate(self, request: dict) -> dict:
        """Store a rating of a recorded answer (POST /v1/ratings); the stored rating, or an OpenAI-style error."""
        if self.recorder is None:
            raise _Refused(404, "recording_off", "answers are not recorded here: start the server with --record")
        try:
            given = RatingRequest.model_validate(request)
        except ValidationError as exc:
            raise _Refused(400, "invalid_rating", _first_problem(exc)) from None
        rating = Rating(given.id, given.rating == "up", given.comment, given.correction, given.user or "anonymous")
        try:
            trace_id = await asyncio.wait_for(asyncio.wrap_future(self.recorder.rate(rating)), RATING_WAIT_S)
        except RatingRefused as refusal:
            raise _Refused(refusal.status, refusal.code, str(refusal)) from None
        except TimeoutError:
            raise _Refused(
                503, "recording_busy", "the answer store did not take the rating in time: send it again"
            ) from None
        except Exception as exc:  # noqa: BLE001 (MLflow's store failing: the client hears it, the server goes on)
            raise _Refused(503, "recording_failed", f"the rating was not stored: {exc}") from None
        return {"object": "rating", "id": given.id, "rating": given.rating, "trace_id": trace_id}

    def _check_route(self, scope) -> None:
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        if self.expected and not hmac.compare_digest(given, self.expected):
            why = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
            raise _Refused(401, "invalid_api_key", why)
        path = scope["path"]
        if not (path.startswith("/v1/") or path in SERVED_PATHS):
            why = f"{path} is not served here: a server of one model answers /v1/..., /health and /docs only"
            raise _Refused(403, "route_not_served", why)

    def _with_served_name(self, body: bytes, scope) -> bytes:
        """The request with the served name as its `model`: the one model answers whatever a request names, as
        llama.cpp's server does (transformers serve pinned to one model refuses every other name)."""
        if dict(scope.get("headers", [])).get(b"content-type", b"").startswith(b"multipart/"):  # audio, as it is
            return body
        request = _json_request(body)
        return json.dumps({**request, "model": self.served_name}).encode() if "model" in request else body


async def _read_body(scope, receive, limit: int) -> bytes | None:
    """The request's body, or None if the client left; refused past `limit` bytes, declared or read."""
    too_large = _Refused(413, "request_too_large", f"the request body is over {limit} bytes (--max-body-mb)")
    declared = dict(scope.get("headers", [])).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size, message = [], 0, {"more_body": True}
    while message.get("more_body"):
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise too_large
    return b"".join(chunks)


def _json_request(body: bytes) -> dict:
    """The body as a JSON object, or a 400 that says why not (json's recursion ends in RecursionError, a 500)."""
    too_deep = _Refused(400, "invalid_json", f"the request body is nested more than {MAX_JSON_DEPTH} deep")
    try:
        request = json.loads(body)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise _Refused(400, "invalid_json", f"the request body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise _Refused(400, "invalid_json", "the request body must be a JSON object")
    if _nesting_depth(request) > MAX_JSON_DEPTH:
        raise too_deep
    return request


def _nesting_depth(value) -> int:
    """How deep lists and objects nest in `value`, counted without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _body_then(body: bytes, receive):
    """An ASGI receive that gives `body`, then hands on to the server's own, which tells when the client
    leaves: transformers stops generating for a client that left only when it hears of it."""
    given = False

    async def receive_body_then_the_rest():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_body_then_the_rest


class RatingRequest(BaseModel):
    """The body of POST /v1/ratings."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="the completion's id, as its response gave it (chatcmpl-...)")
    rating: Literal["up", "down"]
    comment: str | None = Field(None, description="why: stored as the feedback's rationale")
    correction: str | None = Field(None, description="the answer that should have been given")
    user: str | None = Field(None, description="who rates (stored as the feedback's source)")


def _first_problem(exc: ValidationError) -> str:
    problem = exc.errors()[0]
    where = ".".join(str(part) for part in problem["loc"]) or "body"
    allowed = "a JSON object with id, rating ('up' or 'down'), and optionally comment, correction, user"
    return f"rating: {where}: {problem['msg']} ({allowed})"


async def _answer_json(send, answer: dict) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


async def _answer_error(send, refusal: _Refused) -> None:
    error = {"message": str(refusal), "type": "invalid_request_error", "param": None, "code": refusal.code}
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps({"error": error}).encode()})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def guarded_app(app, served_name: str, options: ApiOptions, recorder: AnswerRecorder | None = None):
    """transformers' app behind the gate, and on loopback behind the browser guard as well."""
    gate = OneModelGate(app, served_name, options.api_key, int(options.max_body_mb * 1_000_000), recorder)
    if not is_loopback(options.host):
        return gate
    own_name = f"[{options.host}]" if ":" in options.host else options.host  # as a Host header names it
    return BrowserGuard(gate, options.port, tuple(dict.fromkeys((*LOOPBACK_NAMES, own_name))))


@contextlib.contextmanager
def _gated_uvicorn(front):
    """transformers serve builds its app and hands it to `uvicorn.Config` in one call: the one place to
    put `front(app)` before every route, its own included. uvicorn's `Server.startup`, which opens the
    socket, then checks that the app it serves is that front: a transformers release that builds its
    server otherwise is refused rather than served without the gate."""
    import uvicorn

    config_class, startup, fronts = uvicorn.Config, uvicorn.Server.startup, []

    def gated_config(app, **options):
        fronts.append(front(app))
        return config_class(fronts[-1], **options)

    async def startup_behind_the_gate(server, sockets=None):
        if not fronts or not _serves_through(server.config.loaded_app, fronts[-1]):
            raise ApiError(
                "transformers' server was not built as tunefactory expects (its app is not behind the gate "
                "that checks keys, routes and bodies): refusing to serve; use the transformers pyproject.toml pins"
            )
        return await startup(server, sockets=sockets)

    uvicorn.Config, uvicorn.Server.startup = gated_config, startup_behind_the_gate
    try:
        yield
    finally:
        uvicorn.Config, uvicorn.Server.startup = config_class, startup


def _serves_through(app, front) -> bool:
    """Whether `app` is `front`, or uvicorn's middleware around it (each holds the next as `.app`)."""
    for _ in range(8):
        if app is front:
            return True
        app = getattr(app, "app", None)
    return False


class ScratchOwner(BaseModel):
    """Who made a copy's directory: a later server reads it to tell a killed server's leftovers."""

    pid: int
    identity: str | None  # process_identity: no later process shares it


def claimed_scratch(parent: Path | None, pid: int) -> Path:
    """A new directory for a served copy (in `parent`, else the temporary directory), recorded as `pid`'s."""
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
    (scratch / OWNER_FILE).write_text(ScratchOwner(pid=pid, identity=process_identity(pid)).model_dump_json())
    return scratch


def remove_stale_copies(parent: Path | None = None) -> None:
    """Delete the copies of servers killed before they could (SIGKILL, out of memory), and no others."""
    for scratch in Path(parent or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            owner = ScratchOwner.model_validate_json((scratch / OWNER_FILE).read_text())
        except (OSError, ValidationError):
            continue  # not a copy's directory, or one being made now
        if owner.identity is not None and process_identity(owner.pid) != owner.identity:
            shutil.rmtree(scratch, ignore_errors=True)


def served_copy(model: ServedModel, target: Path) -> Path:
    """`target`: the adapter merged onto its base in the base's dtype, or a link to the model's directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if model.adapter is None:
        target.symlink_to(model.model_dir.resolve(), target_is_directory=True)
        return target
    print(f"tunefactory: merging {model.adapter} onto {model.model_dir} to serve it", flush=True)
    return merged_model(model.model_dir, model.adapter, target, dtype="auto")


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise ApiError(f"port {port} on {host} is in use: choose another with --port") from None


def check_served_name(name: str, origin: str = "--served-model-name") -> str:
    if not SERVED_NAME.fullmatch(name):
        allowed = "letters, digits, '.', '-', '_' and spaces, in one part or two joined by '/'"
        raise ApiError(f"{origin} {name!r}: a served name is {allowed}, such as self-cognition or acme/nova")
    return name


def check_options(options: ApiOptions) -> None:
    """The options' mistakes, each a one-line message before anything loads."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ApiError("transformers' server is not installed: `make install` (transformers[serving])")
    if options.served_name is not None:
        check_served_name(options.served_name)
    if not 0 < options.max_body_mb < float("inf"):
        raise ApiError(f"--max-body-mb {options.max_body_mb}: must be a number of megabytes above 0")
    if not (options.api_key or options.public_without_key or is_loopback(options.host)):
        raise ApiError(
            f"--host {options.host} is not a loopback address: anyone who can reach it could use the model. "
            f"Set --api-key (or {API_KEY_ENV}), or pass --public-without-key to serve it open"
        )
    check_port_free(options.host, options.port)


def serve_api(reference: str, workspace: Path, options: ApiOptions) -> None:
    """Serve MODEL until Ctrl-C or SIGTERM (uvicorn's signal handling); its copy is deleted then."""
    check_options(options)
    model = resolve_model(reference, Path(workspace))
    served_name = options.served_name or check_served_name(model.name, f"{reference}: its name")
    # uvicorn stops on SIGINT or SIGTERM, then raises the signal again for the handler that was there before:
    # for SIGTERM too that is KeyboardInterrupt. Set before the copy is made, so that one while merging
    # deletes it as well
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with contextlib.ExitStack() as scratch_stack:
            remove_stale_copies()
            scratch = claimed_scratch(None, os.getpid())
            scratch_stack.callback(shutil.rmtree, scratch, ignore_errors=True)
            served_copy(model, scratch / served_name)
            recorder = answer_recorder(model, served_name, Path(workspace)) if options.record else None
            if recorder is not None:
                scratch_stack.callback(recorder.close)  # after the server stopped: what is queued is written
            # transformers serve names the model by the path it loads: relative to here, that is the served name
            scratch_stack.enter_context(contextlib.chdir(scratch))
            _serve(served_name, model, options, recorder)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("tunefactory: the API server stopped", flush=True)


def answer_recorder(model: ServedModel, served_name: str, workspace: Path) -> AnswerRecorder:
    """The recorder of this server's answers, into the workspace's MLflow (opened on its own thread)."""
    from tasks.runtime.tracking import tracking_uri

    source = str((model.adapter or model.model_dir).resolve())
    return AnswerRecorder(tracking_uri(workspace.resolve()), ServedVersion(served_name, model.version, source))


def _serve(served_name: str, model: ServedModel, options: ApiOptions, recorder: AnswerRecorder | None) -> None:
    from transformers.cli.serve import Serve

    key_note = " (API key required)" if options.api_key else ""
    where = f"http://{options.host}:{options.port}/v1"
    print(f"tunefactory: serving {served_name!r} ({model.adapter or model.model_dir}) at {where}{key_note}", flush=True)
    if recorder is not None:
        experiment = answers_experiment(served_name)
        print(
            f"tunefactory: recording answers in {recorder.tracking_uri}, experiment {experiment!r}; "
            f"rate them at {where}/ratings",
            flush=True,
        )
    with _gated_uvicorn(lambda app: guarded_app(app, served_name, options, recorder)):
        # only the arguments every 5.x Serve takes: the rest of its Python API changes between releases
        Serve(force_model=served_name, host=options.host, port=options.port)
