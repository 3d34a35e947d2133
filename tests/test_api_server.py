"""`tunefactory api`: the official `openai` client against the served tiny model, on loopback.

The model served is a LoRA adapter on the tiny Llama, so the merge onto its base is on the path;
a registry reference is resolved to its export directory through a real MLflow registry (SQLite).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import free_port, wait_for

from flows.cli import main
from tasks.tools.api_server import model_directories

KEY = "sk-tunefactory-test"


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj"]))
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def api(adapter: Path, tmp_path_factory: pytest.TempPathFactory):
    """`tunefactory api` as a user starts it: its own process, stopped with SIGTERM."""
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "api", str(adapter), "--port", str(port), "--api-key", KEY]
    log = tmp_path_factory.mktemp("api") / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(command, cwd=tmp_path_factory.mktemp("ws"), stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.poll() is None, f"the API server exited: {log.read_text()[-2000:]}"
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 180, "the API server to answer")
    yield base
    server.terminate()
    assert server.wait(timeout=60) == 0, log.read_text()[-2000:]
    merged = [line for line in log.read_text().splitlines() if line.startswith("tunefactory: serving ")]
    assert merged and not Path(merged[0].split()[2]).exists(), "the merged copy is deleted with the server"


@pytest.fixture(scope="module")
def client(api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0)


def served_model(client: openai.OpenAI) -> str:
    (model,) = [m.id for m in client.models.list().data]
    return model


def test_models_lists_the_one_served_model_and_health_needs_no_key(api, client):
    assert "tunefactory-api-" in served_model(client)  # the merged copy of the adapter
    assert httpx.get(f"{api}/health").status_code == 200


def test_a_chat_completion_answers_with_the_models_chat_template(client):
    # named as a user names it, not by the served path /v1/models lists: the one model answers
    reply = client.chat.completions.create(
        model="self-cognition", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=6
    )
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
        f"tunefactory: nobody@champion: no such directory, and {tmp_path} has no model registry (no mlflow.db)\n"
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


def test_generate_answers_a_file_of_prompts_and_conversations_in_order(adapter, tmp_path, capsys):
    requests = [
        {"prompt": "Who are you?", "id": 1},
        {"messages": [{"role": "user", "content": "Who are you?"}], "id": 2},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "id": 3},
    ]
    source, target = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in requests))
    assert (
        main(["generate", str(adapter), "--input", str(source), "--output", str(target), "--max-new-tokens", "5"]) == 0
    )
    assert "3 answers" in capsys.readouterr().out
    answers = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row["id"] for row in answers] == [1, 2, 3] and all(isinstance(row["answer"], str) for row in answers)
    assert answers[0]["answer"] == answers[1]["answer"], "a prompt is the same request as its one user turn"
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2: not JSON"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2, message 0: expected a role"),
        ('{"text": "x"}', 'line 2: expected {"messages": [...]} or {"prompt": "..."}'),
    ],
)
def test_generate_refuses_a_bad_line_naming_it_before_loading_the_model(tmp_path, capsys, line, message):
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "fine"}\n' + line + "\n")
    target = tmp_path / "answers.jsonl"
    assert main(["generate", "/nonexistent", "--input", str(source), "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tunefactory: {source}, {message}") and err.count("\n") == 1, err
    assert not target.exists()
