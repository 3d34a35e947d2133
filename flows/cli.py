"""The `tunefactory` command: run a pipeline, preview its data, chat with a result.

    tunefactory run deployments/self_cognition.yaml [--set train.learning_rate=1e-4 ...]
    tunefactory serve deployments/self_cognition.yaml --cron "0 2 * * *"
    tunefactory preview deployments/self_cognition.yaml
    tunefactory prepare deployments/self_cognition.yaml   (the data stages alone)
    tunefactory chat workspace/models/self-cognition
    tunefactory api self-cognition@champion [--port 8000 --api-key KEY]   (OpenAI-compatible)
    tunefactory generate self-cognition@champion --input prompts.jsonl --output answers.jsonl
    tunefactory validate SPEC | tunefactory schema
    tunefactory ui start | stop   (`make ui`, `make ui-stop`)
    tunefactory sweep SPEC --grid train.learning_rate=1e-4,5e-4 --grid train.lora.rank=8,16
    tunefactory compare SPEC [--last 5] | tunefactory compare --runs ID ID ...
    tunefactory lineage self-cognition@candidate | tunefactory promote self-cognition/3

Mistakes in a spec or a dataset are reported as one message naming the key, file or row,
before any stage runs; a traceback means a bug in tunefactory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from flows.spec import PipelineSpec, SpecError, load_spec
from tasks.contracts.stage_infos import ExportInfo
from tasks.runtime.redaction import redact_uri

EXIT_USER_ERROR = 2


def check_inputs(spec: PipelineSpec) -> None:
    """Read the model source, every dataset's first rows and the evaluation sets the spec names,
    so that mistakes surface before stage one (the template stage reads every row)."""
    from tasks.components.benchmarks import check_benchmarks
    from tasks.components.chat_encoding import template_supports_tools
    from tasks.contracts.spec_sections import GGUF_ARCHITECTURES, STAGE_DATA
    from tasks.dataset.registry import DataError
    from tasks.stages.evaluate import eval_sets
    from tasks.stages.materialize_model import model_chat_template, model_type_of, source_fingerprint
    from tasks.stages.template_dataset import peek_examples

    source_fingerprint(spec.model.name_or_path)
    model_type = model_type_of(spec.model.name_or_path) if "gguf" in spec.export.formats else None
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
            template = spec.model.template_text() or model_chat_template(spec.model.name_or_path)
            if template is not None and not template_supports_tools(template):
                which = spec.model.chat_template or f"the chat template of {spec.model.name_or_path}"
                raise SpecError(
                    f"{key}: the data holds tools or function calls, and {which} cannot render them; "
                    "set model.chat_template: chatml_tools (or a .jinja file that renders tools and tool_calls)"
                )
    # read as the evaluate stage reads them, so a bad row, pattern, benchmark file or task name
    # stops the run here, not after training
    eval_sets(spec.evaluate, spec.dataset.registry, spec.dataset.template_vars)
    check_benchmarks(spec.evaluate.benchmarks)


def user_errors() -> tuple[type[Exception], ...]:
    from tasks.components.gguf_writer import GGUFError
    from tasks.contracts.child_process import WorkerError
    from tasks.dataset.registry import DataError
    from tasks.runtime.local_servers import ServerError
    from tasks.runtime.model_registry import RegistryError
    from tasks.stages.materialize_model import ModelSourceError
    from tasks.stages.train_nodes import JoinError
    from tasks.tools.api_server import ApiError
    from tasks.tools.compare_runs import CompareError

    errors = SpecError, DataError, ModelSourceError, WorkerError, RegistryError, CompareError, ServerError, JoinError
    return (*errors, ApiError, GGUFError)


def connect_prefect(spec: PipelineSpec):
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


def ready_to_run(spec: PipelineSpec, server) -> None:
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


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary(result: dict[str, Any], temporary_prefect: bool = False) -> str:
    """The end-of-run report: stages, evaluation before and after, where the model and runs are."""
    from tasks.components.intervals import interval_text, is_headline

    stages = result["stages"]
    rows = [
        [name, "completed", "reused" if m["reused"] else "ran", f"{m['elapsed_s']:.1f}s"] for name, m in stages.items()
    ]
    parts = ["Stages", table(rows, ["stage", "status", "ran/reused", "duration"])]
    metrics = stages.get("evaluate", {}).get("metrics", {})
    names = sorted({k.split("_", 1)[1] for k in metrics if k.startswith(("base_", "tuned_")) and is_headline(k)})
    if names:

        def cell(key: str) -> str:
            interval = interval_text(metrics, key)
            return "-" if key not in metrics else f"{metrics[key]:.3f}" + (f" {interval}" if interval else "")

        rows = [[n, cell(f"base_{n}"), cell(f"tuned_{n}")] for n in names]
        header = ["metric", "base [95% interval] n", "tuned [95% interval] n"]
        parts += ["", "Evaluation (before -> after)", table(rows, header)]
    export = stages.get("export")
    if export:
        info = ExportInfo.model_validate(export["info"])
        model_dir = Path(export["output_dir"]) / info.model_dir
        parts += [
            "",
            f"Exported model: {model_dir}",
            f"  registered in MLflow as {info.registered_model} version {info.version} "
            f"(@{info.alias}); chat with it: tunefactory chat {model_dir}",
        ]
    tracking = result["tracking"]
    uri = redact_uri(tracking["uri"])  # the summary is printed and kept in logs: no credentials
    parts += ["", f"MLflow run {tracking['parent_run_id']} (experiment {tracking['experiment_id']}):"]
    if uri.startswith("sqlite"):
        parts.append("  make ui   then open http://127.0.0.1:5000")
    else:
        parts.append(f"  {uri}/#/experiments/{tracking['experiment_id']}/runs/{tracking['parent_run_id']}")
    flow_run_id = result.get("flow_run_id", "")
    if os.environ.get("PREFECT_API_URL") and not temporary_prefect:
        ui = redact_uri(os.environ["PREFECT_API_URL"].removesuffix("/api"))
        parts.append(f"Prefect flow run: {ui}/runs/flow-run/{flow_run_id}")
    else:
        parts.append(
            f"Prefect flow run {flow_run_id}: in Prefect's local history (`prefect server start` shows it); "
            "start `make ui` first and later runs appear in its Prefect UI"
        )
    return "\n".join(parts)


def command_run(args: argparse.Namespace) -> int:
    """Run the pipeline (`run`), or only its data stages (`prepare`: model, templating, tokenization)."""
    spec = load_spec(args.spec, args.set)
    server = connect_prefect(spec)
    check_inputs(spec)
    from flows.pipeline import finetune, prepare

    ready_to_run(spec, server)
    pipeline = prepare if args.command == "prepare" else finetune
    state = pipeline(spec, return_state=True)
    flow_run_id = state.state_details.flow_run_id
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        reason = str(error) if isinstance(error, BaseException) else state.message
        print(
            f"\ntunefactory: the pipeline run {flow_run_id} {state.name.lower()}: {reason}\n"
            "Finished stages are kept. To continue at the failed stage, run the same command again, or:\n"
            f"  prefect flow-run retry {flow_run_id} --entrypoint flows/pipeline.py:{pipeline.fn.__name__}",
            file=sys.stderr,
        )
        return 1
    print()
    print(summary(state.result(), temporary_prefect=server is not None))
    print(time_report())
    return 0


def time_report() -> str:
    """Wall time since this process started, split into model compute and orchestration."""
    import psutil

    from tasks.contracts.child_process import model_compute_seconds

    wall = time.time() - psutil.Process().create_time()
    compute = model_compute_seconds()
    return (
        f"Time: {wall:.1f}s in all; model compute {compute:.1f}s (training, evaluation and export workers, "
        f"model conversion); orchestration {wall - compute:.1f}s (start-up, Prefect, MLflow, stage bookkeeping)"
    )


def command_serve(args: argparse.Namespace) -> int:
    """Serve the pipeline on a schedule from this process (Prefect's flow.serve, no work pool)."""
    spec = load_spec(args.spec, args.set)
    report_to_running_servers(spec)
    check_inputs(spec)
    from flows.pipeline import finetune

    finetune.serve(
        name=args.name or spec.name,
        cron=args.cron,
        interval=args.interval,
        parameters={"spec": spec.model_dump(mode="json")},
        description=f"tunefactory pipeline from {args.spec}",
        tags=["tunefactory"],
        limit=1,  # runs of one pipeline queue up instead of competing for the same machine
    )
    return 0


def command_preview(args: argparse.Namespace) -> int:
    """The first rows as the template stage writes them, for the spec's first training stage."""
    from tasks.contracts.spec_sections import STAGE_DATA
    from tasks.stages.template_dataset import peek_examples, preview_rows

    spec = load_spec(args.spec, args.set)
    data, kind = spec.data_for(spec.train), STAGE_DATA[spec.train.stage]
    examples, sources = peek_examples(
        data.names, data.registry, data.template_vars, kind, rows=max(args.rows, 1) * 20,
        max_samples=data.max_samples,
        skip_bad_rows=data.on_bad_row == "skip", seed=data.seed,
    )  # fmt: skip
    for source in sources:
        skipped = f", {source['skipped_in_first']} of the first rows skipped" if source["skipped_in_first"] else ""
        print(f"{source['name']}: {source['file']}, first {source['rows']} rows read{skipped}")
    print(f"{kind} examples for stage {spec.train.stage}; the first {args.rows} of the first rows of each dataset:\n")
    for row in preview_rows(examples, args.rows):
        print(f"[{row.pop('dataset')} #{row.pop('row')}]")
        for role, text in row.items():
            print(f"  {role:>9}: {text}")
    return 0


def command_validate(args: argparse.Namespace) -> int:
    import yaml

    spec = load_spec(args.spec, args.set)
    data = spec.model_dump(mode="json")
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text) != data:  # PyYAML writes some line separators (U+0085, U+2028) unquoted
        text = yaml.safe_dump(data, sort_keys=False)  # escaped: what is printed reads back as the spec
    print(text, end="")
    print(f"# valid; spec hash {spec.digest()}")
    return 0


def command_schema(_: argparse.Namespace) -> int:
    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                print(f"{prefix}{name}:  # {field.description}")
                walk(annotation, prefix + "  ")
            else:
                default = field.get_default(call_default_factory=True)
                print(f"{prefix}{name}: {default!r}  # {field.description}")

    walk(PipelineSpec, "")
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    """The grid's variants as subflows of one Prefect flow, then their comparison."""
    from flows.sweep import expand_grid, parse_grid

    spec = load_spec(args.spec, args.set)
    grid = parse_grid(args.grid)
    variants = expand_grid(spec, grid)  # every variant validated before anything runs
    server = connect_prefect(spec)
    check_inputs(spec)
    print(f"tunefactory: {len(variants)} variants: " + "; ".join(label for label, _ in variants))
    from flows.sweep import sweep

    ready_to_run(spec, server)

    state = sweep(spec, grid, return_state=True)
    if not state.is_completed():
        print(f"tunefactory: the sweep {state.name.lower()}: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    rows = [[v["label"], v["state"]] for v in result["variants"]]
    print("\n" + table(rows, ["variant", "state"]))
    comparison = result["comparison"]
    if comparison:
        print_comparison(Path(comparison["paths"]["csv"]), comparison["paths"])
    failed = [v for v in result["variants"] if v["state"] != "Completed"]
    return 1 if failed else 0


def print_comparison(csv: Path, paths: dict[str, Any]) -> None:
    import pandas as pd

    frame = pd.read_csv(csv, index_col="run").drop(columns=["run_id"])
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print("\n" + frame.to_string(float_format=lambda v: f"{v:.4g}"))
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in paths.items()))


def command_compare(args: argparse.Namespace) -> int:
    from flows.compare import comparison_dir, run_comparison

    if args.spec:
        spec = load_spec(args.spec, args.set)
        workspace, experiment = Path(spec.workspace), spec.name
    elif args.runs:
        workspace, experiment = Path(args.workspace), None
    else:
        raise SpecError("compare: give a spec (its latest runs) or --runs RUN_ID ...")
    workspace = workspace.resolve()
    out = Path(args.out) if args.out else comparison_dir(workspace, experiment or "selected-runs")
    _, paths = run_comparison(workspace, experiment, args.runs, args.last, out)
    print_comparison(paths["csv"], paths)
    return 0


def registry_client(workspace: str):
    from tasks.runtime.model_registry import registry_client

    return registry_client(workspace)


def command_lineage(args: argparse.Namespace) -> int:
    from tasks.runtime.lineage import format_lineage, model_lineage

    lineage = model_lineage(registry_client(args.workspace), args.model)
    print(json.dumps(lineage, indent=2) if args.json else format_lineage(lineage))
    return 0


def command_promote(args: argparse.Namespace) -> int:
    from tasks.runtime.model_registry import CHAMPION, promote

    metrics = [m for m in (args.metrics or "").split(",") if m.strip()] or None
    client = registry_client(args.workspace)
    version, reasons = promote(client, args.model, force=args.force, metrics=metrics, margin=args.margin)
    print(f"tunefactory: {version.name} version {version.version} is now @{CHAMPION}")
    print("\n".join(f"  {reason}" for reason in reasons))
    return 0


def command_ui(args: argparse.Namespace) -> int:
    from tasks.runtime import local_servers

    workspace = Path(args.workspace)
    if args.action == "stop":
        stopped = local_servers.stop(workspace)
        if stopped is None:
            print("tunefactory: no servers recorded")
        elif stopped:
            print(f"tunefactory: stopped the {' and '.join(stopped)} server{'s' * (len(stopped) > 1)}")
        else:
            print(
                "tunefactory: the recorded servers are no longer running (or their process ids are someone "
                "else's now): nothing was signalled, and the record is removed"
            )
        return 0
    try:
        servers = local_servers.start(workspace, args.prefect_port, args.mlflow_port)
    except local_servers.ServerError as exc:
        print(f"tunefactory: {exc}", file=sys.stderr)
        return 1
    print(
        f"Prefect UI: {servers.prefect_url}\n"
        f"MLflow UI:  {servers.mlflow_url}\n"
        f"Runs in {workspace}/ now report to both (databases and logs in {workspace}/). "
        "For a worker or a shell of your own:\n"
        f"  export PREFECT_API_URL={servers.prefect_api_url}\n"
        "Stop both with: make ui-stop"
    )
    return 0


def command_train_node(args: argparse.Namespace) -> int:
    from tasks.stages.train_nodes import join_training

    join_training(Path(args.workspace).resolve(), args.node_rank, args.timeout)
    return 0


def command_api(args: argparse.Namespace) -> int:
    from tasks.tools.api_server import API_KEY_ENV, ApiOptions, serve_api

    options = ApiOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV),
        served_name=args.served_model_name,
        max_body_mb=args.max_body_mb,
        public_without_key=args.public_without_key,
    )
    serve_api(args.model, Path(args.workspace), options)
    return 0


def command_generate(args: argparse.Namespace) -> int:
    from tasks.tools.batch_generate import generate_file, whole_lines

    target = Path(args.output)
    try:
        answered, failed = generate_file(
            args.model, Path(args.input), target, Path(args.workspace), args.max_new_tokens, args.batch_size
        )
    except KeyboardInterrupt:
        kept = f"{whole_lines(target)} lines kept in {target}; the same command resumes after them"
        print(f"tunefactory: interrupted; {kept}", file=sys.stderr)
        return 130
    if failed:
        print(f'tunefactory: {answered} answers and {failed} failed lines (with an "error" each) in {target}',
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"tunefactory: {answered} answers in {target}")
    return 0


def command_gguf(args: argparse.Namespace) -> int:
    from tasks.tools.gguf_export import export_gguf

    out = Path(args.out) if args.out else None
    target, gap = export_gguf(args.model, Path(args.workspace), args.type, out)
    print(f"tunefactory: {target} ({target.stat().st_size / 2**20:.1f} MiB), logits within {gap:.1e} of the model's")
    print(f"  Ollama: cd {target.parent} && ollama create {target.stem} -f Modelfile && ollama run {target.stem}")
    return 0


def command_chat(args: argparse.Namespace) -> int:
    from tasks.tools.chat import chat_loop

    chat_loop(args.path, max_new_tokens=args.max_new_tokens, system=args.system)
    return 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="tunefactory", description="LLM fine-tuning as a declarative pipeline.")
    commands = main.add_subparsers(dest="command", required=True)
    _spec_commands(commands)
    _run_and_model_commands(commands)
    _using_the_model_commands(commands)
    return main


def _spec_commands(commands) -> None:
    """The commands that take a spec: run, prepare, serve, preview, validate, schema, sweep."""

    def with_spec(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("spec", help="pipeline spec (YAML)")
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a spec value, e.g. train.learning_rate=1e-4 (repeatable)",
        )
        return sub

    with_spec("run", "run the pipeline").set_defaults(handler=command_run)
    with_spec(
        "prepare", "build the base model and the templated and tokenized data only (a later run reuses them)"
    ).set_defaults(handler=command_run)
    serve = with_spec("serve", "run the pipeline on a schedule from this process, until stopped")
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='a cron schedule, e.g. "0 2 * * *" for 02:00 every night')
    when.add_argument("--interval", type=float, help="seconds between runs")
    serve.add_argument("--name", help="deployment name (default: the spec's name)")
    serve.set_defaults(handler=command_serve)
    preview = with_spec("preview", "show the first rows after templating")
    preview.add_argument("--rows", type=int, default=5)
    preview.set_defaults(handler=command_preview)
    with_spec("validate", "check a spec and print it resolved").set_defaults(handler=command_validate)
    commands.add_parser("schema", help="list every spec key with its default").set_defaults(handler=command_schema)
    sweep = with_spec("sweep", "run a grid of spec variants, sharing the stages they have in common, then compare")
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a spec key and the values to try, e.g. train.learning_rate=1e-4,5e-4 (repeatable: the grid)",
    )
    sweep.set_defaults(handler=command_sweep)


def _run_and_model_commands(commands) -> None:
    """The commands about runs and registered models: compare, lineage, promote, ui, train-node."""
    compare = commands.add_parser("compare", help="compare pipeline runs: table (CSV, Markdown) and plot")
    compare.add_argument("spec", nargs="?", help="compare this spec's latest runs")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=argparse.SUPPRESS)
    compare.add_argument("--runs", nargs="+", metavar="RUN_ID", help="MLflow pipeline run ids to compare")
    compare.add_argument("--last", type=int, default=5, help="how many of the latest runs (default 5)")
    compare.add_argument("--workspace", default="workspace", help="with --runs: the workspace whose MLflow to read")
    compare.add_argument("--out", help="folder for comparison.csv/.md/.png (default: workspace/comparisons/NAME)")
    compare.set_defaults(handler=command_compare)
    for name, help_text, handler in (
        ("lineage", "trace a registered model back to its runs, data and base model", command_lineage),
        ("promote", "move @champion to a model version unless it evaluates worse beyond noise", command_promote),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("model", help="MODEL (newest version), MODEL/VERSION or MODEL@ALIAS")
        sub.add_argument("--workspace", default="workspace")
        sub.set_defaults(handler=handler)
        if name == "lineage":
            sub.add_argument("--json", action="store_true", help="print the lineage as JSON")
        else:
            sub.add_argument("--force", action="store_true", help="promote even if it evaluates worse")
            sub.add_argument(
                "--metrics", help="comma-separated metrics to gate on (default: the version's export.promotion_metrics)"
            )
            sub.add_argument(
                "--margin",
                type=float,
                help="how much worse beyond noise a metric may be (default: export.promotion_margin)",
            )
    ui = commands.add_parser("ui", help="start or stop the Prefect and MLflow servers of a workspace (loopback)")
    ui.add_argument("action", choices=["start", "stop"])
    ui.add_argument("--workspace", default="workspace")
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.set_defaults(handler=command_ui)
    node = commands.add_parser(
        "train-node", help="on another machine: join a train stage whose spec sets train.nnodes (shared workspace)"
    )
    node.add_argument("--workspace", default="workspace", help="the pipeline's workspace, shared with node 0")
    node.add_argument("--node-rank", type=int, required=True, help="this machine's node number, 1 .. nnodes-1")
    node.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the train stage to start")
    node.set_defaults(handler=command_train_node)


def _using_the_model_commands(commands) -> None:
    """The commands that use a model: api, generate, gguf, chat."""
    api = commands.add_parser("api", help="an OpenAI-compatible endpoint over a model (transformers serve)")
    api.add_argument("model", help="export or adapter directory, or MODEL, MODEL/VERSION, MODEL@ALIAS of the registry")
    api.add_argument("--workspace", default="workspace", help="whose registry resolves MODEL@ALIAS")
    api.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $TUNEFACTORY_API_KEY, or none)")
    api.add_argument(
        "--served-model-name", help="the name /v1/models and answers show (default: the registry's or directory's)"
    )
    api.add_argument("--max-body-mb", type=float, default=8.0, help="larger request bodies get 413 (default: 8)")
    api.add_argument(
        "--public-without-key", action="store_true", help="allow a --host other than loopback without an API key"
    )
    api.set_defaults(handler=command_api)
    generate = commands.add_parser("generate", help="answer a JSON Lines file of prompts or conversations, batched")
    generate.add_argument("model", help="as for api: a directory, or MODEL, MODEL/VERSION, MODEL@ALIAS")
    generate.add_argument("--input", required=True, help='JSON Lines: {"messages": [...]} or {"prompt": "..."}')
    generate.add_argument("--output", required=True, help="JSON Lines: each input line with its answer")
    generate.add_argument("--workspace", default="workspace", help="whose registry resolves MODEL@ALIAS")
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--batch-size", type=int, default=8)
    generate.set_defaults(handler=command_generate)
    gguf = commands.add_parser("gguf", help="write a model as one GGUF file (llama.cpp, Ollama) with a Modelfile")
    gguf.add_argument("model", help="as for api: a directory, or MODEL, MODEL/VERSION, MODEL@ALIAS")
    gguf.add_argument("--type", default="f16", help="f16 (default), bf16, q8_0 or f32")
    gguf.add_argument("--out", help="the .gguf file (default: WORKSPACE/gguf/MODEL-TYPE.gguf)")
    gguf.add_argument("--workspace", default="workspace")
    gguf.set_defaults(handler=command_gguf)
    chat = commands.add_parser("chat", help="talk to an exported model or an adapter checkpoint")
    chat.add_argument("path", help="exported model directory, or a directory holding adapter_config.json")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    chat.set_defaults(handler=command_chat)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except user_errors() as exc:
        print(f"tunefactory: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tunefactory: interrupted; finished stages are kept and reused on the next run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
