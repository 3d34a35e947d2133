"""The MLflow Model Registry: registering an export, naming a version, promoting it.

A version is named as `MODEL` (the newest), `MODEL/3` or `MODEL@champion`. Every version
carries tags that make it comparable: the spec hash, the base model's digest, the digest of
the evaluation set it was scored on, the tuned model's evaluation metrics with their sample
sizes and standard errors, and the gate `promote` applies to it (metrics and margin).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.contracts.spec_sections import DEFAULT_GATE_METRICS
from tasks.runtime.intervals import compare, estimate, higher_is_better, is_headline, shown

CANDIDATE, CHAMPION = "candidate", "champion"
# the tags a version carries for the gate `promote` applies (export.promotion_metrics, _margin)
GATE_METRICS_TAG, GATE_MARGIN_TAG = "promotion_metrics", "promotion_margin"


class RegistryError(ValueError):
    """A model, version or alias that does not exist, or a refused promotion."""


def model_artifacts(client: MlflowClient, run_id: str, model_dir: Path) -> str:
    """Put the exported files among the export run's artifacts; returns their URI.

    A registered version's source must lie inside its run's artifacts (an MLflow server
    refuses anything else). On a local artifact store the files are hard-linked, so the
    gigabytes exist once on disk; a remote store gets a copy.
    """
    from mlflow.utils.file_utils import local_file_uri_to_path

    artifact_uri = client.get_run(run_id).info.artifact_uri
    if not artifact_uri.startswith("file:"):
        client.log_artifacts(run_id, str(model_dir), "model")
        return f"{artifact_uri}/model"
    target = Path(local_file_uri_to_path(artifact_uri)) / "model"
    for file in model_dir.rglob("*"):
        link = target / file.relative_to(model_dir)
        if file.is_dir() or (link.exists() and link.stat().st_size == file.stat().st_size):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        try:
            os.link(file, link)
        except OSError:  # another filesystem
            shutil.copy2(file, link)
    return target.as_uri()


def register_model(
    client: MlflowClient, run_id: str, name: str, alias: str, model_dir: Path, tags: dict[str, str]
) -> str:
    """The Model Registry version for an export run, created once; the alias points at it.

    Idempotent, so a reused export (or one whose registration was interrupted) is registered
    exactly once and keeps its version number; its tags follow the latest evaluation.
    """
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0].version
    else:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = model_artifacts(client, run_id, model_dir.resolve())
        version = client.create_model_version(name, source=source, run_id=run_id).version
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, alias, version)
    return str(version)


def registry_client(workspace: str | Path) -> MlflowClient:
    """The MLflow client of a workspace's registry (its server while `make ui` runs it)."""
    from tasks.runtime.tracking import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri(Path(workspace).resolve()))


def resolve_version(client: MlflowClient, reference: str) -> ModelVersion:
    """`MODEL`, `MODEL/VERSION` or `MODEL@ALIAS` to a model version."""
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in reference:
            name, version = reference.rsplit("/", 1)
            return client.get_model_version(name, version)
        versions = client.search_model_versions(f"name = '{reference}'", order_by=["version_number DESC"])
    except MlflowException as exc:
        raise RegistryError(f"{reference}: no such model version or alias ({exc.message.splitlines()[0]})") from None
    if not versions:
        raise RegistryError(f"{reference}: no registered model of that name")
    return versions[0]


def version_directory(reference: str, workspace: str | Path) -> tuple[Path, ModelVersion]:
    """The directory of the exported files of the version `reference` names in the workspace's
    registry, and that version; a RegistryError naming the reference and the registry otherwise."""
    from urllib.parse import urlparse

    from mlflow.utils.file_utils import local_file_uri_to_path

    from tasks.runtime.tracking import tracking_uri

    workspace = Path(workspace).resolve()
    uri = tracking_uri(workspace)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise RegistryError(f"{reference}: {workspace} has no model registry (no mlflow.db)")
    try:
        version = resolve_version(registry_client(workspace), reference)
    except RegistryError as exc:
        raise RegistryError(f"{exc} (registry of {workspace})") from None
    if urlparse(version.source).scheme not in ("", "file"):
        where = version.source
        raise RegistryError(f"{reference}: version {version.version} is stored at {where}, not on this machine")
    return Path(local_file_uri_to_path(version.source)), version


def evaluation(version: ModelVersion) -> dict[str, float]:
    """The tuned model's metrics of a version, without the prefix: `tuned_val_loss` is `val_loss`."""
    found = {}
    for key, value in version.tags.items():
        if key.startswith("tuned_"):
            try:
                found[key.removeprefix("tuned_")] = float(value)
            except ValueError:
                continue
    return found


class Gate(NamedTuple):
    metrics: list[str]
    margin: float

    def describe(self) -> str:
        return f"metrics {', '.join(self.metrics)}; margin {self.margin:g}"


def version_gate(version: ModelVersion, metrics: list[str] | None = None, margin: float | None = None) -> Gate:
    """The gate recorded on the version at export, with what the command line overrides."""
    recorded = version.tags.get(GATE_METRICS_TAG)
    chosen = metrics or (recorded.split(",") if recorded else list(DEFAULT_GATE_METRICS))
    if margin is None:
        margin = float(version.tags.get(GATE_MARGIN_TAG, 0.0))
    return Gate([m.strip().removeprefix("tuned_") for m in chosen if m.strip()], margin)


def gate_verdict(
    new: dict[str, float], old: dict[str, float], gate: Gate, improve: list[str] = (),
    sides: tuple[str, str] = ("the new version", "the champion"),
) -> tuple[bool, list[str]]:  # fmt: skip
    """Whether scores `new` pass the gate against `old`, with one line per metric: not worse beyond
    noise (and the margin) on any gated metric, and better (the point estimate) on each of `improve`.
    `sides`: how a missing metric's message names the two."""
    reasons, ok = [], True
    for metric in [*gate.metrics, *improve]:
        if metric not in new or metric not in old:
            known = ", ".join(sorted(filter(is_headline, new if metric not in new else old))) or "none"
            side = sides[0] if metric not in new else sides[1]
            return False, [f"{metric} is not a metric of {side} (its metrics: {known})"]
    for metric in gate.metrics:
        worse, reason = compare(metric, new, old, gate.margin)
        reasons.append(reason)
        ok = ok and not worse
    for metric in improve:
        gain = (new[metric] - old[metric]) * (1 if higher_is_better(metric) else -1)
        found, before = estimate(new, metric), estimate(old, metric)
        text = f"{shown(found)} vs {shown(before)}" if found and before else f"{new[metric]:.3f} vs {old[metric]:.3f}"
        reasons.append(f"{metric} {text}: {'better' if gain > 0 else 'not better'}, as required to replace it")
        ok = ok and gain > 0
    return ok, reasons


def promotion_verdict(
    candidate: ModelVersion, champion: ModelVersion | None, gate: Gate, improve: list[str] = ()
) -> tuple[bool, list[str]]:
    """Whether `candidate` may become champion, with one line per gated metric.

    Refused when it is worse than the champion beyond noise (and the margin) on any gated metric,
    or not better on a metric of `improve`; equal within noise is not worse
    (tasks/runtime/intervals.py says how noise is measured).
    """
    if champion is None:
        return True, ["no champion yet"]
    if candidate.version == champion.version:
        return True, [f"version {candidate.version} is already the champion"]
    ours, theirs = candidate.tags.get("eval_set_digest"), champion.tags.get("eval_set_digest")
    if not ours or ours != theirs:
        return False, [f"evaluated on another evaluation set ({ours} vs champion's {theirs}); not comparable"]
    sides = (f"version {candidate.version}", f"version {champion.version}")
    return gate_verdict(evaluation(candidate), evaluation(champion), gate, improve, sides)


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def make_champion(
    client: MlflowClient, candidate: ModelVersion, champion: ModelVersion | None, gate: Gate, verdict: list[str]
) -> None:
    """Move the alias, and record on the version what it replaced and why."""
    client.set_registered_model_alias(candidate.name, CHAMPION, candidate.version)
    record = {
        "promoted_over": champion.version if champion else "",
        "promoted_gate": gate.describe(),
        "promoted_verdict": "; ".join(verdict)[:5000],
    }
    for key, value in record.items():
        client.set_model_version_tag(candidate.name, candidate.version, key, value)


def promote(
    client: MlflowClient, reference: str, force: bool = False, metrics: list[str] | None = None,
    margin: float | None = None,
) -> tuple[ModelVersion, list[str]]:  # fmt: skip
    """Move the `champion` alias to a version unless it evaluates worse than the current one beyond
    noise; the gate used and the verdict are recorded on the version."""
    candidate = resolve_version(client, reference)
    champion = current_champion(client, candidate.name)
    gate = version_gate(candidate, metrics, margin)
    ok, reasons = promotion_verdict(candidate, champion, gate)
    if not ok and not force:
        raise RegistryError(
            f"{candidate.name} version {candidate.version} not promoted ({gate.describe()}): "
            + "; ".join(reasons)
            + " (--force promotes it anyway)"
        )
    make_champion(client, candidate, champion, gate, reasons + (["forced"] if not ok else []))
    return candidate, [f"gate: {gate.describe()}", *reasons, *(["forced"] if not ok else [])]


def promote_run(
    client: MlflowClient, name: str, version: str, base_version: str, measured: dict[str, float], improve: list[str]
) -> tuple[bool, list[str]]:
    """The end of a run with `export.promote`: its new version becomes champion only through the gate
    (the version's own, and better on each of `improve`). Where the run's base model was the
    champion (`NAME@champion`), its `base_` scores are the champion's on the same sets, and the new
    version is judged against them; else against the champion version's recorded scores, as
    `tunefactory promote` does. A refusal leaves the champion and is recorded on the version."""
    candidate = client.get_model_version(name, version)
    champion = current_champion(client, name)
    gate = version_gate(candidate)
    if champion is not None and base_version == f"{name}/{champion.version}":
        scores = {side: {k.removeprefix(f"{side}_"): v for k, v in measured.items() if k.startswith(f"{side}_")}
                  for side in ("tuned", "base")}  # fmt: skip
        sides = (f"version {version}", f"this run's base (champion version {champion.version})")
        if scores["base"]:
            ok, reasons = gate_verdict(scores["tuned"], scores["base"], gate, improve, sides)
        else:
            ok, reasons = False, ["this run did not score its base (evaluate.compare_base: false): nothing to judge by"]
        reasons = [f"against champion version {champion.version}, scored as this run's base on the same sets", *reasons]
    else:
        ok, reasons = promotion_verdict(candidate, champion, gate, improve)
    head = [f"gate: {gate.describe()}" + (f"; better on {', '.join(improve)}" if improve else "")]
    if ok and (champion is None or champion.version != candidate.version):
        make_champion(client, candidate, champion, gate, reasons)
    elif not ok:
        client.set_model_version_tag(name, version, "promotion_refused", "; ".join(reasons)[:5000])
    return ok, head + reasons
