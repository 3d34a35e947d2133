"""What `tunefactory run`, `prepare`, `serve` and `sweep` do before a flow starts.

The inputs the spec names are read (model source, every dataset's first rows, the evaluation sets),
so that a mistake is one message naming the key, file or row, before stage one rather than after
training; and the command is connected to the Prefect server it reports to: the servers of
`make ui` while they run, else a temporary one, booted while the rest of the command loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from flows.spec import PipelineSpec, SpecError

if TYPE_CHECKING:
    from tasks.runtime.local_servers import TemporaryPrefectServer


def check_inputs(spec: PipelineSpec) -> None:
    """Read the model source, every dataset's first rows and the evaluation sets the spec names,
    so that mistakes surface before stage one (the template stage reads every row)."""
    from tasks.components.benchmarks import check_benchmarks
    from tasks.components.chat_encoding import template_supports_tools
    from tasks.contracts.spec_sections import GGUF_ARCHITECTURES, STAGE_DATA
    from tasks.dataset.registry import DataError
    from tasks.stages.evaluate import eval_sets, preference_pairs
    from tasks.stages.materialize_model import model_chat_template, model_type_of, source_directory, source_fingerprint
    from tasks.stages.template_dataset import peek_examples

    model = source_directory(spec.model.name_or_path, source_fingerprint(spec.model.name_or_path, spec.workspace))
    model_type = model_type_of(model) if "gguf" in spec.export.formats else None
    if model_type is not None and model_type not in GGUF_ARCHITECTURES:  # a hub model: the export checks
        raise SpecError(
            f"export.formats: gguf: {spec.model.name_or_path} is a {model_type!r} model; "
            f"the GGUF writer maps {', '.join(GGUF_ARCHITECTURES)} (remove gguf, or export it another way)"
        )
    for plan in spec.training_plan():
        data = spec.data_for(plan.config)
        section = "train" if plan.name == "train" else f"then.{plan.name}"
        key = "dataset.names" if plan.config.datasets is None else f"{section}.datasets"
        try:
            examples, sources = peek_examples(
                data.names, data.registry, data.template_vars, STAGE_DATA[plan.config.stage],
                max_samples=data.max_samples, skip_bad_rows=data.on_bad_row == "skip", seed=data.seed,
            )  # fmt: skip
        except DataError as exc:
            raise DataError(f"{key} (read by stage {plan.config.stage}): {exc}") from None
        if not any(source["rows"] for source in sources):
            raise SpecError(f"{key}: {', '.join(data.names)} hold no rows")
        if any(e.get("tools") or any("tool_calls" in m for m in e.get("messages", [])) for e in examples):
            template = spec.model.template_text() or model_chat_template(model)
            if template is not None and not template_supports_tools(template):
                which = spec.model.chat_template or f"the chat template of {spec.model.name_or_path}"
                raise SpecError(
                    f"{key}: the data holds tools or function calls, and {which} cannot render them; "
                    "set model.chat_template: chatml_tools (or a .jinja file that renders tools and tool_calls)"
                )
    # read as the evaluate stage reads them, so a bad row, pattern, benchmark file or task name
    # stops the run here, not after training
    eval_sets(spec.evaluate, spec.dataset.registry, spec.dataset.template_vars)
    preference_pairs(spec.evaluate.preferences, spec.dataset.registry, spec.dataset.template_vars)
    check_benchmarks(spec.evaluate.benchmarks)


def connect_prefect(spec: PipelineSpec) -> TemporaryPrefectServer | None:
    """The servers of `make ui` if they run; else Prefect's temporary server, launched now so
    that it boots while the command loads (call `wait_until_up` on it before the flow starts)."""
    from tasks.runtime.local_servers import TemporaryPrefectServer

    report_to_running_servers(spec)
    if os.environ.get("PREFECT_API_URL"):
        return None
    server = TemporaryPrefectServer()
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ["PREFECT_UI_URL"] = ""  # it serves no UI: no "View at" link to a page that is not there
    return server


def ready_to_run(spec: PipelineSpec, server: TemporaryPrefectServer | None) -> None:
    """Before the flow starts: MLflow's SQL store imported and the temporary server (if any) answering."""
    if server is None:
        return
    from tasks.runtime.tracking import preload_store

    preload_store(Path(spec.workspace))  # 3 s of imports, while the server is still booting
    server.wait_until_up()


def report_to_running_servers(spec: PipelineSpec) -> None:
    """While `make ui` runs the workspace's servers, this run reports to them.

    Called before Prefect is imported: Prefect reads its API URL from the environment once.
    """
    from tasks.runtime.local_servers import running

    servers = running(spec.workspace)
    if servers is None or "PREFECT_API_URL" in os.environ:
        return
    os.environ["PREFECT_API_URL"] = servers.prefect_api_url
    print(f"tunefactory: reporting to Prefect at {servers.prefect_url} and MLflow at {servers.mlflow_url}")
