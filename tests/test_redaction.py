"""A tracking URI with credentials is used as given but never shown: not in the printed summary,
not in the Prefect artifact that everyone with the UI open can read."""

from __future__ import annotations

from pathlib import Path

from flows.results import PipelineResult
from flows.run_report import summary
from tasks.runtime.prefect_artifacts import publish_export_summary
from tasks.runtime.redaction import redact_uri
from tasks.runtime.tracking import Tracking

SECRET_URI = "https://alice:s3cr3t-token@mlflow.example.com:8443/tracking"


def test_credentials_in_a_uri_are_hidden_and_the_rest_kept():
    assert redact_uri(SECRET_URI) == "https://***@mlflow.example.com:8443/tracking"
    assert redact_uri("https://token@host") == "https://***@host"
    assert redact_uri("sqlite:////data/ws/mlflow.db") == "sqlite:////data/ws/mlflow.db"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_the_run_summary_shows_no_credentials(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "https://bob:hunter2@prefect.example.com/api")
    result = PipelineResult(
        stages={},
        tracking=Tracking(uri=SECRET_URI, experiment_id="7", parent_run_id="abc"),
        flow_run_id="f1",
    )
    text = summary(result)
    assert "s3cr3t-token" not in text and "alice" not in text and "hunter2" not in text
    assert "https://***@mlflow.example.com:8443/tracking/#/experiments/7/runs/abc" in text
    assert "https://***@prefect.example.com/runs/flow-run/f1" in text


def test_the_export_artifact_in_prefect_shows_no_credentials(prefect_harness):
    from prefect import flow, get_client

    @flow(name="redaction-check")
    def publish() -> str:
        from prefect.runtime import flow_run

        publish_export_summary(Path("/models/nova"), "nova", "3", "champion", SECRET_URI, "7", "run9")
        return flow_run.id

    flow_run_id = publish()
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert "s3cr3t-token" not in artifact.data and "alice" not in artifact.data
    assert "https://***@mlflow.example.com:8443/tracking/#/experiments/7/runs/run9" in artifact.data
