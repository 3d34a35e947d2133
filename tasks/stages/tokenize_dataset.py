"""Stage 3: render each example with the base model's chat template and mask the labels.

The work runs in `tasks/workers/data.py` with the encoders of `tasks/components/chat_encoding.py`:
chat (sft) examples become input_ids and labels (-100 except the assistant's turns, function
calls included, unless `train_on_prompt`), cut to `cutoff_len`; text (pt) is concatenated and
cut into blocks; pairs, feedback and prompts become the text columns TRL's trainers read. The
result is saved with `datasets.save_to_disk` as `train/` and `val/`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.contracts.child_process import final, run_worker, usable_cores
from tasks.contracts.manifest import Manifest, StageResult
from tasks.contracts.spec_sections import TokenizeSpec
from tasks.contracts.stage_infos import ModelInfo, TemplateInfo, TokenizeInfo
from tasks.contracts.worker_configs import TokenizeJob
from tasks.contracts.worker_events import Tokenized
from tasks.runtime.code_version import code_version
from tasks.runtime.prefect_artifacts import publish_token_stats
from tasks.runtime.stage_output import (
    StageContext,
    published_dir,
    run_stage,
    scratch_dir,
    stage_id,
    stage_run_name,
    tree_digest,
)
from tasks.runtime.tracking import StageRun

# what turns templated text into token ids
TOKENIZING_LIBRARIES = ("transformers", "tokenizers", "jinja2", "datasets", "pyarrow")

# settings that change how fast the stage runs, not what it writes
NOT_IN_KEY = {"num_proc"}


def _build(
    config: TokenizeSpec, kind: str, templated: Path, base_model: Manifest, workspace: Path, out: Path, run: StageRun
) -> StageResult:
    logger = get_run_logger()

    job = TokenizeJob(
        templated=str(templated),
        model_path=str(ModelInfo.base_model_path(base_model)),
        trust_remote_code=ModelInfo.of(base_model).trust_remote_code,
        kind=kind,
        cutoff_len=config.cutoff_len,
        train_on_prompt=config.train_on_prompt,
        num_proc=config.num_proc or usable_cores(),
        scratch_dir=str(scratch_dir(workspace)),
        out=str(out),
    )
    done = final(run_worker("tasks.workers.data", job, out / "job.json", on_output=logger.info), Tokenized)
    if done.train.examples == 0:
        raise ValueError("no training example is left after tokenization; raise tokenize.cutoff_len")
    run.log_text(done.sample, "sample_rendered.txt")
    digest = tree_digest(out, ["train", "val"])
    run.log_dataset(name="tokenized", source=str(published_dir(out)), digest=digest[:16], context="tokenized")
    publish_token_stats(done)
    return StageResult(
        metrics=done.metrics(), info=TokenizeInfo(tokenized_digest=digest, kind=kind, cutoff_len=config.cutoff_len)
    )


@task(name="tokenize-dataset", task_run_name=stage_run_name("tokenize dataset"))
def tokenize_dataset(
    ctx: StageContext,
    config: TokenizeSpec,
    templated: Manifest,
    base_model: Manifest,
    for_stage: str = "train",
) -> Manifest:
    """Tokenize the templated split with the base model's chat template and label masks."""
    kind = TemplateInfo.of(templated).kind
    return run_stage(
        stage_id("tokenize", for_stage),
        {**config.model_dump(mode="json", exclude=NOT_IN_KEY), "kind": kind},
        [templated, base_model],
        code_version(__name__, ("tasks.workers.data",), TOKENIZING_LIBRARIES),
        ctx,
        lambda out, run: _build(config, kind, templated.path, base_model, ctx.workspace, out, run),
    )
