"""`tunefactory api --record`: answers kept as MLflow traces, ratings stored on them as human feedback.

One server for the module, its own process as a user starts it, serving the tiny Llama with an API
key and recording into a workspace's MLflow (SQLite); the official `openai` client talks to it and
the test reads what was stored through MLflow's own API, as the MLflow UI would.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from api_processes import KEY, serving, start_api, stop
from loopback import wait_for

from tasks.runtime.answer_records import answers_experiment

SERVED_NAME = "nova"


@pytest.fixture(scope="module")
def recording(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("recording-api")
    workspace = directory / "workspace"
    server = serving(
        start_api(
            tiny_model,
            directory,
            "--api-key",
            KEY,
            "--record",
            "--workspace",
            str(workspace),
            "--served-model-name",
            SERVED_NAME,
        )
    )
    yield server, workspace
    stop(server)


@pytest.fixture(scope="module")
def client(recording) -> openai.OpenAI:
    server, _ = recording
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def rate(client: openai.OpenAI, **body) -> dict:
    return client.post("/ratings", body=body, cast_to=object)


def recorded(workspace: Path, completion_id: str, timeout: float = 60.0):
    """The trace of one completion, as MLflow gives it (waiting for the server's writer to store it)."""
    import mlflow

    store = workspace / "mlflow.db"
    wait_for(store.exists, timeout, "the server to open its MLflow store")  # else this would build it too
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        experiment = client.get_experiment_by_name(answers_experiment(SERVED_NAME))
        if experiment is not None:
            found = client.search_traces(
                locations=[experiment.experiment_id], filter_string=f"tags.completion_id = '{completion_id}'"
            )
            if found:
                return client.get_trace(found[0].info.trace_id)
        time.sleep(0.5)
    raise AssertionError(f"completion {completion_id} was not recorded within {timeout:.0f} s")


def test_answers_plain_and_streamed_are_recorded_as_they_were_sent(recording, client, tiny_model):
    _, workspace = recording
    messages = [{"role": "user", "content": "Who are you?"}]
    answer = client.chat.completions.create(model="any", messages=messages, max_tokens=12, temperature=0.0)
    stream = client.chat.completions.create(model="any", messages=messages, max_tokens=12, stream=True)
    chunks = list(stream)
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    completion = client.completions.create(model="any", prompt="The capital of France is", max_tokens=6)

    assert answer.id.startswith("chatcmpl-") and chunks[0].id.startswith("chatcmpl-") and answer.id != chunks[0].id
    trace = recorded(workspace, answer.id)
    span = trace.data.spans[0]
    assert span.inputs == {"messages": messages}
    assert span.outputs["choices"][0]["message"]["content"] == answer.choices[0].message.content
    assert span.attributes["max_tokens"] == 12 and span.attributes["temperature"] == 0.0
    assert trace.info.tags["model_name"] == SERVED_NAME and trace.info.tags["model_source"] == str(tiny_model.resolve())
    assert trace.info.execution_duration > 0, "the span covers the request's time"

    streamed = recorded(workspace, chunks[0].id).data.spans[0]
    assert streamed.outputs["choices"][0]["message"]["content"] == streamed_text, "a stream is recorded joined"
    assert streamed.outputs["choices"][0]["finish_reason"] == chunks[-1].choices[0].finish_reason
    assert streamed.attributes["stream"] is True

    plain = recorded(workspace, completion.id).data.spans[0]
    assert plain.inputs == {"prompt": "The capital of France is"}
    assert plain.outputs["choices"][0]["text"] == completion.choices[0].text


def test_a_rating_with_a_comment_and_a_correction_is_human_feedback_on_the_answers_trace(recording, client):
    _, workspace = recording
    answer = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8
    )
    stored = rate(client, id=answer.id, rating="down", comment="wrong sum", correction="4", user="ana")
    assert stored["rating"] == "down" and stored["id"] == answer.id

    trace = recorded(workspace, answer.id)
    assert stored["trace_id"] == trace.info.trace_id
    by_name = {a.name: a for a in trace.info.assessments}
    assert by_name["rating"].value is False and by_name["rating"].rationale == "wrong sum"
    assert by_name["rating"].source.source_type == "HUMAN" and by_name["rating"].source.source_id == "ana"
    assert by_name["expected_response"].value == "4"


def test_a_rating_sent_right_after_a_streamed_answer_finds_it(client):
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True
    )
    completion_id = [chunk.id for chunk in stream][0]
    assert rate(client, id=completion_id, rating="up")["rating"] == "up"


def test_ratings_of_unknown_ids_bad_values_or_twice_are_openai_errors(recording, client):
    server, _ = recording
    answer = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    with pytest.raises(openai.NotFoundError) as unknown:
        rate(client, id="chatcmpl-" + "0" * 32, rating="up")
    assert unknown.value.code == "completion_not_found"
    with pytest.raises(openai.NotFoundError):
        rate(client, id="' OR 1=1 --", rating="up")
    with pytest.raises(openai.BadRequestError) as bad:
        rate(client, id=answer.id, rating="meh")
    assert bad.value.code == "invalid_rating" and "rating" in bad.value.message and "'up'" in bad.value.message
    with pytest.raises(openai.BadRequestError, match="stars"):
        rate(client, id=answer.id, rating="up", stars=5)

    rate(client, id=answer.id, rating="up")
    with pytest.raises(openai.ConflictError) as twice:
        rate(client, id=answer.id, rating="down")
    assert twice.value.code == "already_rated"

    no_key = httpx.post(f"{server.url}/v1/ratings", json={"id": answer.id, "rating": "up"}, timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"


def test_a_clients_own_request_id_does_not_become_the_completions_id(recording, client):
    server, _ = recording
    body = {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {KEY}", "X-Request-ID": "chatcmpl-" + "1" * 32}
    ids = [httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60).json()["id"]]
    ids += [httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60).json()["id"]]
    assert len(set(ids)) == 2 and headers["X-Request-ID"] not in ids


def test_a_stream_the_client_leaves_is_not_recorded(recording, client):
    server, workspace = recording
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Tell a long story"}], max_tokens=2000, stream=True
    )
    left = next(iter(stream)).id
    stream.close()
    finished = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    recorded(workspace, finished.id)  # written after the abandoned one would have been
    with pytest.raises(openai.NotFoundError):
        rate(client, id=left, rating="up")
