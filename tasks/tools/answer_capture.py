"""How the API server's gate sees a completion it records: an id of its own, and the response as sent.

The gate gives each recorded request a completion id (`chatcmpl-` or `cmpl-` and 32 hex digits) as
its `x-request-id`, which transformers serve uses as the response's `id`: a client's own header
could otherwise give two answers one id, and a rating would not know which it rates. The response
passes through unchanged; a copy of its body is kept and, once the last byte is sent, read back as
one answer in OpenAI's response shape: the JSON as it is, or a stream's chunks joined. A stream
that stops before its finishing chunk (the client left, generation failed) is not an answer and is
not recorded, nor is an error status.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from tasks.runtime.answer_records import Answer

RECORDED_ROUTES = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}
ID_PREFIX = {"chat.completions": "chatcmpl", "completions": "cmpl"}
# the request keys that are sampling settings, recorded beside the messages
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
)
REQUEST_ID_HEADER = b"x-request-id"


def new_completion_id(route: str) -> str:
    return f"{ID_PREFIX[route]}-{uuid.uuid4().hex}"


def with_request_id(scope: dict, completion_id: str) -> dict:
    """The scope with `completion_id` as its only x-request-id header."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
    return {**scope, "headers": [*headers, (REQUEST_ID_HEADER, completion_id.encode())]}


def capturing_send(send, route: str, completion_id: str, request: dict, on_answer: Callable[[Answer], object]):
    """An ASGI send that sends everything on, then hands a completed answer to `on_answer`."""
    start_ns, status, streamed, chunks = time.time_ns(), 0, False, []

    async def send_and_keep(message) -> None:
        nonlocal status, streamed
        await send(message)
        if message["type"] == "http.response.start":
            status = message["status"]
            streamed = dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and status == 200:
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                body = b"".join(chunks)
                response = _joined_stream(body, route, completion_id) if streamed else _json_or_none(body)
                if response is not None:
                    on_answer(_answer(route, completion_id, request, response, start_ns, streamed))

    return send_and_keep


def _answer(route: str, completion_id: str, request: dict, response: dict, start_ns: int, streamed: bool) -> Answer:
    inputs = {"messages": request.get("messages")} if route == "chat.completions" else {"prompt": request.get("prompt")}
    settings = {key: request[key] for key in SAMPLING_KEYS if key in request}
    return Answer(completion_id, route, inputs, settings, response, start_ns, time.time_ns(), streamed)


def _json_or_none(body: bytes) -> dict | None:
    try:
        response = json.loads(body)
    except ValueError:
        return None
    return response if isinstance(response, dict) and response.get("choices") else None


def _joined_stream(body: bytes, route: str, completion_id: str) -> dict | None:
    """A stream's chunks as the one response they make, or None if it never finished."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    usage, model, created = None, None, None
    for event in body.decode("utf-8", errors="replace").split("\n\n"):
        if not event.startswith("data: ") or event == "data: [DONE]":
            continue
        try:
            chunk = json.loads(event.removeprefix("data: "))
        except ValueError:
            return None
        if "error" in chunk:
            return None
        model, created, usage = chunk.get("model", model), chunk.get("created", created), chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            piece = (choice.get("delta") or {}).get("content") if route == "chat.completions" else choice.get("text")
            texts.setdefault(index, []).append(piece or "")
            if choice.get("finish_reason"):
                finish[index] = choice["finish_reason"]
    if not finish or set(finish) != set(texts):
        return None
    choices = [_choice(route, index, "".join(texts[index]), finish[index]) for index in sorted(texts)]
    kind = "chat.completion" if route == "chat.completions" else "text_completion"
    response: dict[str, Any] = {"id": completion_id, "object": kind, "created": created, "model": model}
    return {**response, "choices": choices, **({"usage": usage} if usage else {})}


def _choice(route: str, index: int, text: str, finish_reason: str) -> dict:
    if route == "chat.completions":
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    return {"index": index, "text": text, "finish_reason": finish_reason}
