"""What `tunefactory api --record` keeps: each answer as an MLflow trace, each rating as its human feedback.

One trace per completion, in the experiment `answers_experiment(model name)` of the workspace's
MLflow (the MLflow UI lists them under the experiment's Traces tab): the request (messages or
prompt) as the span's inputs, the answer in OpenAI's response shape as its outputs, the sampling
settings as attributes, the request's start and end as the span's times, and tags naming the
completion's `id` (the one the OpenAI response carries) and the model version that answered.
A rating is MLflow feedback named `rating` (True for up, the comment as its rationale, the rater
as its HUMAN source); a corrected answer is an expectation named `expected_response`, MLflow's
name for the answer that should have been given.

One background thread writes them, in the order they came: answering never waits for MLflow,
and a rating sent right after its answer is written after that answer's trace.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

ASYNC_TRACES = "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"
COMPLETION_ID_TAG = "completion_id"
MODEL_NAME_TAG = "model_name"
MODEL_VERSION_TAG = "model_version"
MODEL_SOURCE_TAG = "model_source"
RATING = "rating"
CORRECTION = "expected_response"
# what the server's own ids look like (chatcmpl-/cmpl- and 32 hex digits): anything else is no
# completion of ours, refused before it reaches a search filter
COMPLETION_ID = re.compile(r"(chatcmpl|cmpl)-[0-9a-f]{32}")


def answers_experiment(model_name: str) -> str:
    """The MLflow experiment that holds a served model's answers and ratings."""
    return f"{model_name}-answers"


@dataclass(frozen=True)
class Answer:
    """One completed answer, as the server sent it."""

    completion_id: str
    route: str  # "chat.completions" or "completions"
    inputs: dict[str, Any]  # {"messages": [...]} or {"prompt": ...}
    settings: dict[str, Any]  # the request's sampling settings (temperature, max_tokens, ...)
    response: dict[str, Any]  # in OpenAI's response shape, also for a streamed answer
    start_ns: int
    end_ns: int
    streamed: bool


@dataclass(frozen=True)
class Rating:
    completion_id: str
    up: bool
    comment: str | None
    correction: str | None
    rater: str


class RatingRefused(Exception):
    """A rating that cannot be stored; `status` and `code` are the HTTP answer's."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class ServedVersion:
    name: str
    version: str  # the registry's version number, "" for a directory served by path
    source: str  # the directory the weights came from


class AnswerRecorder:
    """Writes answers and ratings to MLflow on one thread of its own; `close` waits for what is queued."""

    def __init__(self, tracking_uri: str, served: ServedVersion):
        self.tracking_uri, self.served = tracking_uri, served
        self.experiment_id: str | None = None
        self._restore: dict[str, str | None] | None = None  # MLflow's process-wide settings before `_open`
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="answer-records")
        # MLflow's import and the store's opening take seconds: done now, while the model loads, not
        # beside the first answers
        self._writer.submit(self._open).add_done_callback(_warn_if_failed)

    def record(self, answer: Answer) -> Future[str]:
        """Queue the answer's trace; the future gives its trace id once written (a failure is printed)."""
        written = self._writer.submit(self._write_answer, answer)
        written.add_done_callback(_warn_if_failed)
        return written

    def rate(self, rating: Rating) -> Future[str]:
        """Queue the rating, after every answer queued before it; the future gives the rated trace's id
        or raises RatingRefused."""
        return self._writer.submit(self._write_rating, rating)

    def close(self) -> None:
        """Write what is queued, then give MLflow back the process-wide settings `_open` changed."""
        self._writer.shutdown(wait=True)
        if self._restore is not None:
            import mlflow

            mlflow.set_tracking_uri(self._restore.get("MLFLOW_TRACKING_URI"))
            os.environ.pop(ASYNC_TRACES, None)
            if self._restore.get(ASYNC_TRACES) is not None:
                os.environ[ASYNC_TRACES] = self._restore[ASYNC_TRACES]

    def _open(self) -> str:
        """The experiment's id, opening the store on first use (in the writer thread: MLflow's import and
        a store's first opening take seconds, which no request should wait for)."""
        if self.experiment_id is None:
            self._restore = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", ASYNC_TRACES)}
            # the trace is written when its span ends, on this thread: no second queue inside MLflow
            os.environ[ASYNC_TRACES] = "false"
            import mlflow

            from tasks.runtime.store_template import seed_store

            seed_store(self.tracking_uri)
            mlflow.set_tracking_uri(self.tracking_uri)
            name = answers_experiment(self.served.name)
            client = mlflow.MlflowClient(self.tracking_uri)
            found = client.get_experiment_by_name(name)
            self.experiment_id = found.experiment_id if found else client.create_experiment(name)
        return self.experiment_id

    def _write_answer(self, answer: Answer) -> str:
        import mlflow
        from mlflow.entities import SpanType

        experiment_id = self._open()
        tags = {
            COMPLETION_ID_TAG: answer.completion_id,
            MODEL_NAME_TAG: self.served.name,
            MODEL_VERSION_TAG: self.served.version,
            MODEL_SOURCE_TAG: self.served.source,
        }
        span = mlflow.start_span_no_context(
            answer.route,
            span_type=SpanType.CHAT_MODEL if answer.route == "chat.completions" else SpanType.LLM,
            inputs=answer.inputs,
            attributes={**answer.settings, "stream": answer.streamed},
            tags=tags,
            experiment_id=experiment_id,
            start_time_ns=answer.start_ns,
        )
        span.end(outputs=answer.response, end_time_ns=answer.end_ns)
        return span.trace_id

    def _write_rating(self, rating: Rating) -> str:
        import mlflow
        from mlflow.entities import AssessmentSource

        trace = self._find(rating.completion_id)
        if any(a.name == RATING and a.valid is not False for a in trace.info.assessments):
            raise RatingRefused(409, "already_rated", f"completion {rating.completion_id} is rated already")
        source = AssessmentSource(source_type="HUMAN", source_id=rating.rater)
        trace_id = trace.info.trace_id
        mlflow.log_feedback(trace_id=trace_id, name=RATING, value=rating.up, rationale=rating.comment, source=source)
        if rating.correction is not None:
            mlflow.log_expectation(trace_id=trace_id, name=CORRECTION, value=rating.correction, source=source)
        return trace_id

    def _find(self, completion_id: str):
        import mlflow

        unknown = RatingRefused(404, "completion_not_found", f"no recorded completion has the id {completion_id!r}")
        if not COMPLETION_ID.fullmatch(completion_id):
            raise unknown
        found = mlflow.search_traces(
            locations=[self._open()],
            filter_string=f"tags.{COMPLETION_ID_TAG} = '{completion_id}'",
            return_type="list",
            include_spans=False,
        )
        if not found:
            raise unknown
        return found[0]


def _warn_if_failed(written: Future) -> None:
    if written.exception() is not None:
        print(f"tunefactory: recording: {written.exception()}", flush=True)
