"""`tunefactory api`: the official `openai` client and raw HTTP against the served tiny model, on loopback.

Two servers run for the module, each its own process as a user starts it: one with an API key
serving a LoRA adapter on the tiny Llama (so the merge onto its base is on the path), one without
a key serving an adapter on a bf16 copy of it under a name of the user's. A registry reference is
resolved to its export directory through a real MLflow registry (SQLite).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import openai
import psutil
import pytest
from api_processes import KEY, answers, serving, start_api, stop
from headless_chromium import Browser
from loopback import free_port, wait_for

from flows.cli import main
from tasks.tools.api_server import SCRATCH_PREFIX, claimed_scratch, model_directories, resolve_model

AUTH = {"Authorization": f"Bearer {KEY}"}


def lora_adapter(base: Path, directory: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lora_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "self-cognition")


@pytest.fixture(scope="module")
def bf16_base(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path_factory.mktemp("bf16-base")
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    return base


def served_copies(scratch: Path) -> list[Path]:
    return sorted(scratch.glob(f"{SCRATCH_PREFIX}*"))


class Leftovers(NamedTuple):
    stale: Path  # claimed by a process that is gone: a killed server's
    live: Path  # claimed by a process that runs (this one): another server's


@pytest.fixture(scope="module")
def leftovers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Leftovers]:
    directory = tmp_path_factory.mktemp("api")
    (directory / "tmp").mkdir()
    killed = subprocess.Popen(["sleep", "60"])
    stale = claimed_scratch(directory / "tmp", killed.pid)
    killed.kill()
    killed.wait()
    return directory, Leftovers(stale, claimed_scratch(directory / "tmp", os.getpid()))


@pytest.fixture(scope="module")
def api(adapter: Path, leftovers):
    """The key-protected server, with a body cap of 50 kB; stopped with SIGTERM, its merged copy deleted then."""
    directory, _ = leftovers
    server = serving(start_api(adapter, directory, "--api-key", KEY, "--max-body-mb", "0.05"))
    yield server.url
    stop(server)
    assert served_copies(server.scratch) == [leftovers[1].live], "the merged copy is deleted with the server"


@pytest.fixture(scope="module")
def open_api(bf16_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server without a key (loopback), serving an adapter on a bf16 base under the name `nova`."""
    directory = tmp_path_factory.mktemp("open-api")
    adapter = lora_adapter(bf16_base, directory / "adapter")
    server = serving(start_api(adapter, directory, "--served-model-name", "nova"))
    yield server
    stop(server)


@pytest.fixture(scope="module")
def client(api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0)


def served_model(client: openai.OpenAI) -> str:
    (model,) = [m.id for m in client.models.list().data]
    return model


def test_models_lists_the_one_served_model_by_name_and_health_needs_no_key(api, client):
    assert served_model(client) == "self-cognition"  # the adapter directory's name, not its temporary copy's path
    assert httpx.get(f"{api}/health").status_code == 200


def test_a_chat_completion_answers_with_the_models_chat_template(client):
    # named as a user names it, not by the served path /v1/models lists: the one model answers
    reply = client.chat.completions.create(
        model="any-name", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=6
    )
    assert reply.model == "self-cognition"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    # the prompt went through SmolLM2's chat template: far more tokens than the five words
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens == 6


def test_a_streamed_chat_completion_sends_chunks_before_the_end(client):
    stream = client.chat.completions.create(
        model=served_model(client), messages=[{"role": "user", "content": "Hi"}], max_tokens=12, stream=True
    )
    arrivals = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 5, "several content chunks, not one answer"
    assert arrivals[-1] > arrivals[0], "the chunks arrived over time"


def test_a_plain_completion_continues_the_prompt(client):
    reply = client.completions.create(model=served_model(client), prompt="Once upon a time", max_tokens=4)
    assert isinstance(reply.choices[0].text, str) and reply.usage.completion_tokens == 4


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_a_request_without_the_key_is_refused_with_openais_error(api, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{api}/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api}/v1", api_key=key or "none", max_retries=0).models.list()


def test_a_port_in_use_or_an_unknown_reference_is_one_message(api, tmp_path, capsys):
    port = api.rsplit(":", 1)[1]
    assert main(["api", str(tmp_path), "--port", port]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert main(["api", "nobody@champion", "--workspace", str(tmp_path), "--port", str(free_port())]) == 2
    assert capsys.readouterr().err == (
        f"tunefactory: nobody@champion: {tmp_path} has no model registry (no mlflow.db); "
        "no directory of that name either\n"
    )
    assert not (tmp_path / "mlflow.db").exists(), "nothing created in a workspace that had no registry"


def test_an_unknown_version_in_a_registry_is_one_message(tiny_model, tmp_path, capsys):
    from tasks.runtime.model_registry import registry_client

    registry_client(tmp_path).search_registered_models()  # a registry, empty
    assert main(["api", "nobody@champion", "--workspace", str(tmp_path), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("tunefactory: nobody@champion: no such model version or alias")


def test_a_registry_reference_resolves_to_its_exported_files(tiny_model, tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.runtime.model_registry import register_model
    from tasks.runtime.tracking import tracking_uri

    workspace = tmp_path / "ws"
    workspace.mkdir()
    client = MlflowClient(tracking_uri(workspace))  # the workspace's own SQLite registry
    run = client.create_run(client.create_experiment("served", (workspace / "mlartifacts").as_uri()))
    register_model(client, run.info.run_id, "served", "champion", tiny_model, {})
    for reference in ("served@champion", "served/1", "served"):
        model_dir, adapter = model_directories(reference, workspace)
        assert adapter is None and (model_dir / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
        assert resolve_model(reference, workspace).name == "served", "served under the registry's name"


@pytest.mark.parametrize(
    "method, path", [("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/reset"), ("POST", "/load_model")]
)
def test_every_route_but_health_needs_the_key(api, method, path):
    response = httpx.request(method, f"{api}{path}", json={"model": "gpt2"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", ["/reset", "/load_model"])
def test_model_management_is_refused_even_with_the_key_and_the_model_stays_loaded(api, path):
    response = httpx.post(f"{api}{path}", json={"model": "gpt2"}, headers=AUTH)
    assert response.status_code == 403 and response.json()["error"]["code"] == "route_not_served"
    (model,) = httpx.get(f"{api}/v1/models", headers=AUTH).json()["data"]
    assert model["id"] == "self-cognition" and model["status"]["value"] == "loaded"


def test_an_abandoned_stream_stops_generating(api, client):
    request = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**6, "stream": True}
    with httpx.stream("POST", f"{api}/v1/chat/completions", json=request, headers=AUTH, timeout=60) as stream:
        chunks = (line for line in stream.iter_lines() if line.startswith("data: {"))
        assert [next(chunks) for _ in range(5)], "it was generating"
    # the model answers one request at a time: were the abandoned million tokens still being made,
    # this would wait behind them
    reply = client.with_options(timeout=120).completions.create(model="x", prompt="Once", max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_a_body_over_the_cap_gets_413_and_one_nested_too_deep_400_in_openais_shape(api, client):
    too_big = {"model": "x", "messages": [{"role": "user", "content": "a" * 60_000}]}  # the cap is 50 kB
    response = httpx.post(f"{api}/v1/chat/completions", json=too_big, headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    nested = b'{"model": "x", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    headers = {**AUTH, "Content-Type": "application/json"}
    for body in (nested, b'{"model": "x", "messages": [{"role": "user"'):
        response = httpx.post(f"{api}/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model="x", prompt="Once", max_tokens=2).usage.completion_tokens == 2


def test_copies_left_by_killed_servers_are_removed_at_start_and_no_others(api, leftovers):
    _, copies = leftovers
    assert not copies.stale.exists() and copies.live.exists()


def test_a_public_address_without_a_key_is_refused_unless_asked_for(api, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TUNEFACTORY_API_KEY", raising=False)
    assert main(["api", str(tmp_path), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunefactory: --host 0.0.0.0 is not a loopback address") and err.count("\n") == 1, err
    assert "--api-key" in err and "--public-without-key" in err
    port = api.rsplit(":", 1)[1]  # in use: the check after the one the flag passes
    assert main(["api", str(tmp_path), "--host", "0.0.0.0", "--port", port, "--public-without-key"]) == 2
    assert f"port {port} on 0.0.0.0 is in use" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../up", "a/b/c", ""])
def test_a_served_name_that_is_not_a_name_is_one_message(tmp_path, capsys, name):
    assert main(["api", str(tmp_path), "--served-model-name", name, "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.startswith(f"tunefactory: --served-model-name {name!r}:")


# What a page of another origin tries against a server without a key: a JSON request (the browser
# asks the server first, a preflight), a read, and a blind "simple" POST to /reset (no preflight;
# the page cannot read the answer, but the server acts on it unless it refuses).
ATTACKS = """
const api = API, results = {};
async function attempt(name, request) {
  try { const r = await request(); results[name] = r.type === 'opaque' ? 'sent' : 'answered ' + r.status; }
  catch (e) { results[name] = 'refused'; }
}
(async () => {
  const chat = {model: 'nova', messages: [{role: 'user', content: 'Hi'}], max_tokens: 2};
  await attempt('chat', () => fetch(api + '/v1/chat/completions',
    {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(chat)}));
  await attempt('models', () => fetch(api + '/v1/models'));
  await attempt('reset', () => fetch(api + '/reset', {method: 'POST', mode: 'no-cors'}));
  window.results = results;
})();
"""


def test_a_page_of_another_origin_can_neither_use_nor_reset_the_api(open_api, tmp_path):
    model_processes = {child.pid for child in psutil.Process(open_api.process.pid).children()}
    script = ATTACKS.replace("API", json.dumps(open_api.url))
    (tmp_path / "index.html").write_text(f"<html><body>hello<script>{script}</script></body></html>")
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    browser = Browser()
    try:
        browser.open(f"http://127.0.0.1:{site.server_address[1]}/index.html")
        results = browser.wait_for_script("window.results", "the page's attempts", timeout=60)
    finally:
        browser.close()
        site.shutdown()
    assert results == {"chat": "refused", "models": "refused", "reset": "sent"}
    reply = openai.OpenAI(base_url=f"{open_api.url}/v1", api_key="none", max_retries=0).completions.create(
        model="nova", prompt="Once", max_tokens=2
    )
    # /reset would have stopped the model's process, and this request started another
    assert model_processes <= {child.pid for child in psutil.Process(open_api.process.pid).children()}
    assert reply.model == "nova"


def test_a_rebound_domain_or_a_foreign_origin_gets_403_and_the_openai_client_does_not(open_api):
    port = open_api.url.rsplit(":", 1)[1]
    assert httpx.get(f"{open_api.url}/v1/models", headers={"Host": f"rebound.example:{port}"}).status_code == 403
    foreign = {"Origin": f"http://127.0.0.1:{free_port()}"}
    assert httpx.post(f"{open_api.url}/v1/completions", json={"prompt": "x"}, headers=foreign).status_code == 403
    client = openai.OpenAI(base_url=f"{open_api.url}/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["nova"]


def test_an_adapter_on_a_bf16_base_is_served_from_a_bf16_copy(open_api, bf16_base):
    from safetensors import safe_open

    (copy,) = [path / "nova" for path in served_copies(open_api.scratch)]
    with safe_open(copy / "model.safetensors", "pt") as weights:
        dtypes = {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert (copy / "model.safetensors").stat().st_size < 1.1 * (bf16_base / "model.safetensors").stat().st_size


def test_sigterm_during_the_merge_leaves_no_copy(adapter, tmp_path):
    server = start_api(adapter, tmp_path, "--api-key", KEY)
    wait_for(lambda: "tunefactory: merging" in server.log.read_text(), 120, "the merge to start")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.log.read_text()[-2000:]
    assert served_copies(server.scratch) == []


# A transformers release that builds its server otherwise than the gate expects, as one that
# imported uvicorn's Config before tunefactory could put the gate in it
CONFIG_IMPORTED_EARLY = """
import uvicorn
from transformers.cli.serve import Serve

config, run = uvicorn.Config, Serve.run


def run_with_the_config_it_imported(self, *args, **kwargs):
    uvicorn.Config = config
    return run(self, *args, **kwargs)


Serve.run = run_with_the_config_it_imported
"""


def test_the_server_refuses_to_start_when_its_gate_is_not_in_place(tiny_model, tmp_path):
    server = start_api(tiny_model, tmp_path, "--api-key", KEY, prelude=CONFIG_IMPORTED_EARLY)
    try:
        wait_for(lambda: server.process.poll() is not None or answers(f"{server.url}/health"), 180, "a verdict")
        if server.process.poll() is None:
            unguarded = httpx.get(f"{server.url}/v1/models").status_code
            pytest.fail(f"it serves: /v1/models without the key answered {unguarded}")
    finally:
        server.process.kill()
    assert server.process.wait() == 2
    refusal = "tunefactory: transformers' server was not built as tunefactory expects"
    assert any(line.startswith(refusal) for line in server.log.read_text().splitlines()), server.log.read_text()
