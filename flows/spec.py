"""The pipeline spec: one pydantic model that a YAML file, `--set` overrides and the Prefect UI fill.

Its sections (model, dataset, tokenize, train, evaluate, export) are declared in
`tasks/contracts/spec_sections.py`, where the stages and workers read them; this module puts them together
with the chain of training stages and the retries, loads YAML and reports errors.
`load_spec("deployments/self_cognition.yaml", ["train.learning_rate=1e-4"])` returns a
validated `PipelineSpec` or raises `SpecError` naming the key path, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tasks.contracts.spec_sections import (
    DatasetSpec,
    EvaluateSpec,
    ExportSpec,
    ModelSpec,
    Section,
    TokenizeSpec,
    TrainSpec,
)
from tasks.dataset.registry import check_paths_in_registry


class SpecError(ValueError):
    """A spec the pipeline refuses, with a message meant for the person who wrote it."""


class PlannedStage(NamedTuple):
    name: str
    config: TrainSpec
    start: str | None  # the earlier stage whose model it continues; None: the base model
    reward: str | None  # ppo: the rm stage that scores its answers


# Names the pipeline's other stages use; a training stage in 'then' may not take them.
RESERVED_STAGE_NAMES = {"base", "model", "template", "tokenize", "train", "evaluate", "export"}


class StageRetry(Section):
    retries: int = Field(0, ge=0, description="How many more attempts Prefect makes after the stage fails.")
    delay_seconds: float = Field(10.0, ge=0, description="Seconds to wait before each retry.")


class RetrySpec(Section):
    """Per-stage Prefect retries; kept out of the stages' cache keys (they change nothing made)."""

    model: StageRetry = Field(default_factory=StageRetry, description="Materializing the base model.")
    template: StageRetry = Field(default_factory=StageRetry, description="Templating the datasets.")
    tokenize: StageRetry = Field(default_factory=StageRetry, description="Tokenizing.")
    train: StageRetry = Field(
        default_factory=lambda: StageRetry(retries=1),
        description="Training; a retry resumes from the newest checkpoint.",
    )
    evaluate: StageRetry = Field(default_factory=StageRetry, description="Evaluation.")
    export: StageRetry = Field(default_factory=StageRetry, description="Merge and export.")


class PipelineSpec(Section):
    name: str = Field("self-cognition", description="Name of the pipeline: MLflow experiment, flow-run and model name.")
    workspace: str = Field(
        "workspace",
        description="Directory for stage outputs and the default MLflow database "
        "(relative paths are taken from the current directory).",
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="The base model.")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="Data and templating.")
    tokenize: TokenizeSpec = Field(default_factory=TokenizeSpec, description="Tokenization.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training (the first training stage).")
    then: dict[str, TrainSpec] = Field(
        default_factory=dict,
        description="Further training stages by name, run in this order after 'train' (e.g. reward: {stage: rm}, "
        "policy: {stage: ppo}); each continues from an earlier stage's model (start_from).",
    )
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec, description="Evaluation.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Merge and export.")
    retries: RetrySpec = Field(default_factory=RetrySpec, description="Retries per stage.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"{value!r} must be letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _chain_is_well_formed(self) -> PipelineSpec:
        self.training_plan()  # raises with the key path of the first stage that cannot run
        return self

    @model_validator(mode="after")
    def _data_stays_beside_its_registry(self) -> PipelineSpec:
        """Every dataset and evaluation set the spec names reads files inside its registry's folder,
        unless dataset.allow_paths_outside_registry (checked here, so validate, preview, a sweep
        variant and a run sent through the Prefect API all refuse it before stage one)."""
        if self.dataset.allow_paths_outside_registry:
            return self
        registry = self.dataset.registry
        check_paths_in_registry("dataset.names", self.dataset.names, registry)
        for name, stage in {"train": self.train, **self.then}.items():
            if stage.datasets is not None:
                key = "train.datasets" if name == "train" else f"then.{name}.datasets"
                check_paths_in_registry(key, stage.datasets, registry)
        sets = {"evaluate.identity_prompts": self.evaluate.identity_prompts,
                "evaluate.control_prompts": self.evaluate.control_prompts,
                **{f"evaluate.sets.{i}.dataset": s.dataset for i, s in enumerate(self.evaluate.sets)}}  # fmt: skip
        for key, name in sets.items():
            check_paths_in_registry(key, [name] if name else [], registry, eval_sets=True)
        if self.evaluate.preferences:
            check_paths_in_registry("evaluate.preferences", [self.evaluate.preferences], registry)
        return self

    def training_plan(self) -> list[PlannedStage]:
        """Every training stage in the order they run ('train', then 'then'), with the stage
        whose model each starts from (None: the base) and, for ppo, the rm stage it is scored by."""
        plan, made_lm, made_rm = [], [], []
        for name, stage in {"train": self.train, **self.then}.items():
            where = "train" if name == "train" else f"then.{name}"
            if name != "train" and (not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in RESERVED_STAGE_NAMES):
                raise ValueError(
                    f"{where}: a stage name is lowercase letters, digits and '_', and not one of "
                    + ", ".join(sorted(RESERVED_STAGE_NAMES))
                )
            start = stage.start_from if stage.start_from is not None else (made_lm[-1] if made_lm else "base")
            if start != "base" and start not in made_lm:
                raise ValueError(
                    f"{where}.start_from: {start!r} is not an earlier stage that made a language model "
                    f"(allowed: {', '.join(['base', *made_lm])})"
                )
            reward = None
            if stage.stage == "ppo":
                reward = stage.reward_model or (made_rm[-1] if made_rm else None)
                if reward is None:
                    raise ValueError(f"{where}: a ppo stage needs an earlier stage with stage: rm to score answers")
                if reward not in made_rm:
                    raise ValueError(
                        f"{where}.reward_model: {reward!r} is not an earlier rm stage (rm stages: {', '.join(made_rm)})"
                    )
            plan.append(PlannedStage(name, stage, None if start == "base" else start, reward))
            (made_rm if stage.stage == "rm" else made_lm).append(name)
        return plan

    def data_for(self, stage: TrainSpec) -> DatasetSpec:
        """The dataset section a training stage reads: its own datasets, or dataset.names."""
        return self.dataset if stage.datasets is None else self.dataset.model_copy(update={"names": stage.datasets})

    def digest(self) -> str:
        """Hash of the resolved spec: equal specs give equal digests."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shown(value: Any, limit: int = 80) -> str:
    """A value as a message quotes it: its repr, on one line, shortened past `limit` characters."""
    if not isinstance(value, str) or len(value) <= limit:
        return repr(value)[: limit * 10]
    return f"{value[: limit - 20]!r}... ({len(value)} characters)"


def _key_path(loc: tuple) -> str:
    # a key the spec's author mistyped may hold spaces, newlines or nothing: quoted, it stays one line
    return ".".join(str(p) if re.fullmatch(r"[\w-]+", str(p)) else _shown(str(p)) for p in loc) or "(top level)"


def _format_error(error: dict[str, Any]) -> str:
    path = _key_path(error["loc"])
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key (check the spelling; see 'tunefactory schema')"
    if error["type"] == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{path}: {_shown(error['input'])} is not one of {expected.replace(' or ', ', ')}"
    message = message.removeprefix("Value error, ")
    if not error["loc"]:  # a cross-field check: its message names the keys itself
        return message
    if error["type"] != "value_error" and "input" in error and not isinstance(error["input"], dict):
        return f"{path}: {_shown(error['input'])}: {message}"
    return f"{path}: {message}"


def validate_spec(data: dict[str, Any], source: str = "spec") -> PipelineSpec:
    """Validate a dict as a spec, turning pydantic's errors into one readable SpecError."""
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(err) for err in exc.errors()]
        raise SpecError(f"{source} is not a valid spec:\n  " + "\n  ".join(lines)) from None


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int):
        super().__init__(f"line {line}: {key!r} is set twice in one section (YAML would keep the last silently)")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping refuses it itself
                pass
        return super().construct_mapping(node, deep)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what PyYAML found, on one line (its own message quotes the text over several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).split("\n")[0]
    return f"{where}: {problem}"


def override_value(raw: str) -> Any:
    """A `--set` value parsed as YAML, except that `#` is text: `name=Bot #7` is "Bot #7",
    not "Bot" followed by a YAML comment (a shell line has its own comments)."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if "#" in raw and "#" not in json.dumps(value, default=str):
        return raw.strip()
    return value


def _text_annotation(annotation: Any) -> str:
    """'text' for str (or a choice of strings), 'optional text' for those or None, else ''."""
    choices = get_args(annotation) if get_origin(annotation) is Literal else ()
    if annotation is str or (choices and all(isinstance(choice, str) for choice in choices)):
        return "text"
    if get_origin(annotation) in (Union, UnionType):
        kinds = {_text_annotation(a) if a is not type(None) else "none" for a in get_args(annotation)}
        return "optional text" if kinds == {"text", "none"} else ""
    return ""


def key_kind(keys: list[str]) -> str:
    """Whether the spec key at this path holds text ('text', 'optional text') or anything else ('')."""
    annotation: Any = PipelineSpec
    for key in keys:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(key)
            if field is None:
                return ""  # an unknown key: validation names it
            annotation = field.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return ""
    return _text_annotation(annotation)


def _quoted(raw: str) -> bool:
    return len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` override in place. The value of a text key is the text after
    `=` as written (`name=yes` is "yes", ` Nova` keeps its space), or, quoted whole in YAML's
    way, what the quotes hold; `null`, `~` or nothing clear a key that may be empty; any other
    value is parsed as YAML (numbers, yes/no, `[a, b]`)."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment!r}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise SpecError(f"--set {assignment!r}: empty key in {path!r}")
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise SpecError(f"--set {assignment!r}: {where} is a value, not a section")
        node = child
    kind = key_kind(keys)
    if kind == "optional text" and raw.strip() in ("", "~", "null", "Null", "NULL"):
        node[keys[-1]] = None
        return
    if kind and not _quoted(raw):
        node[keys[-1]] = raw
        return
    try:
        node[keys[-1]] = override_value(raw)
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {assignment!r}: the value is not valid YAML{yaml_problem(exc)}") from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    """Read a YAML spec, apply `--set` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}  # a SafeLoader
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}); save the spec as UTF-8") from None
    except DuplicateKey as exc:
        raise SpecError(f"{path}, {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML{yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the top level must be a mapping of sections, not {type(data).__name__}")
    for assignment in overrides or []:
        apply_override(data, assignment)
    return validate_spec(data, source=str(path))
