"""A grid of spec variants as one Prefect flow: each variant a subflow, then the comparison.

    tunefactory sweep deployments/self_cognition.yaml \
        --grid train.learning_rate=1e-4,5e-4 --grid train.lora.rank=8,16

Variants run one after another (they would compete for the same cores or GPU) in the same
workspace, so the stages they share (the base model, templating, tokenization) are built by
the first and reused by the rest. A variant that fails is reported; the others still run.
"""

import itertools
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.compare import compare as compare_flow
from flows.compare import comparison_dir
from flows.pipeline import finetune
from flows.results import SweepResult, VariantOutcome
from flows.spec import PipelineSpec, SpecError, apply_override, validate_spec


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["train.learning_rate=1e-4,5e-4"]` -> `{"train.learning_rate": ["1e-4", "5e-4"]}`."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise SpecError(f"--grid {item!r}: expected key.path=value1,value2,...")
        grid[key.strip()] = choices
    return grid


def variant_label(choice: dict[str, str]) -> str:
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in choice.items())


def expand_grid(spec: PipelineSpec, grid: dict[str, list[str]]) -> list[tuple[str, PipelineSpec]]:
    """Every combination as a validated spec; a bad key or value names the variant."""
    variants = []
    for values in itertools.product(*grid.values()):
        choice = dict(zip(grid, values, strict=True))
        data = spec.model_dump(mode="json")
        for key, value in choice.items():
            apply_override(data, f"{key}={value}")
        label = variant_label(choice)
        variants.append((label, validate_spec(data, source=f"--grid variant {label}")))
    return variants


def run_variant(spec: PipelineSpec, label: str, variant: PipelineSpec, sweep_id: str) -> VariantOutcome:
    """One variant as a subflow; a failed one is logged and reported, not raised, so the rest still run."""
    run = finetune.with_options(flow_run_name=f"{spec.name} [{label}]")
    state = run(variant, labels={"sweep_flow_run_id": sweep_id, "variant": label}, return_state=True)
    if not state.is_completed():
        get_run_logger().error("variant %s %s: %s", label, state.name.lower(), state.message)
        return VariantOutcome(label=label, state=state.name)
    return VariantOutcome(label=label, state=state.name, pipeline=state.result())


@flow(name="sweep", flow_run_name="{spec.name} sweep")
def sweep(spec: PipelineSpec, grid: dict[str, list[str]]) -> SweepResult:
    """Run every variant of the grid as a subflow, then compare the ones that finished."""
    logger = get_run_logger()
    sweep_id = str(flow_run.id)
    variants = []
    for label, variant in expand_grid(spec, grid):
        logger.info("variant %s", label)
        variants.append(run_variant(spec, label, variant, sweep_id))
    finished = [v.pipeline.tracking.parent_run_id for v in variants if v.pipeline is not None]
    comparison = None
    if finished:
        out = comparison_dir(Path(spec.workspace).resolve(), f"{spec.name}-sweep-{sweep_id[:8]}")
        comparison = compare_flow(spec.workspace, spec.name, run_ids=finished, out=str(out))
    return SweepResult(sweep_flow_run_id=sweep_id, grid=grid, variants=variants, comparison=comparison)
