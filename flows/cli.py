"""The `tunefactory` command: run a pipeline, preview its data, chat with a result.

    tunefactory run deployments/self_cognition.yaml [--set train.learning_rate=1e-4 ...]
    tunefactory serve deployments/self_cognition.yaml --cron "0 2 * * *"
    tunefactory preview deployments/self_cognition.yaml
    tunefactory prepare deployments/self_cognition.yaml   (the data stages alone)
    tunefactory chat workspace/models/self-cognition
    tunefactory api self-cognition@champion [--port 8000 --api-key KEY] [--record]   (OpenAI-compatible)
    tunefactory feedback export self-cognition [--since 2026-12-01 --min-count 50]
    tunefactory generate self-cognition@champion --input prompts.jsonl --output answers.jsonl
    tunefactory validate SPEC | tunefactory schema
    tunefactory ui start | stop   (`make ui`, `make ui-stop`)
    tunefactory sweep SPEC --grid train.learning_rate=1e-4,5e-4 --grid train.lora.rank=8,16
    tunefactory compare SPEC [--last 5] | tunefactory compare --runs ID ID ...
    tunefactory lineage self-cognition@candidate | tunefactory promote self-cognition/3

Mistakes in a spec or a dataset are reported as one message naming the key, file or row,
before any stage runs (flows/preflight.py); a traceback means a bug in tunefactory. What is
printed when a run ends is written in flows/run_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.preflight import check_inputs, connect_prefect, ready_to_run, report_to_running_servers
from flows.run_report import failure_report, print_comparison, summary, sweep_report, time_report
from flows.spec import PipelineSpec, SpecError, load_spec

EXIT_USER_ERROR = 2


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


def command_run(args: argparse.Namespace) -> int:
    """Run the pipeline (`run`), or only its data stages (`prepare`: model, templating, tokenization)."""
    spec = load_spec(args.spec, args.set)
    server = connect_prefect(spec)
    check_inputs(spec)
    from flows.pipeline import finetune, prepare

    ready_to_run(spec, server)
    pipeline = prepare if args.command == "prepare" else finetune
    state = pipeline(spec, return_state=True)
    if not state.is_completed():
        print(failure_report(state, pipeline.fn.__name__), file=sys.stderr)
        return 1
    print()
    print(summary(state.result(), temporary_prefect=server is not None))
    print(time_report())
    return 0


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
    print(sweep_report(result))
    if result.comparison:
        print_comparison(result.comparison.files)
    return 0 if all(v.state == "Completed" for v in result.variants) else 1


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
    _, files = run_comparison(workspace, experiment, args.runs, args.last, out)
    print_comparison(files)
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
        record=args.record,
    )
    serve_api(args.model, Path(args.workspace), options)
    return 0


def command_feedback_export(args: argparse.Namespace) -> int:
    from tasks.tools.feedback_export import export_feedback, since_time

    workspace = Path(args.workspace)
    out = Path(args.out) if args.out else workspace / "feedback" / args.model.replace("/", "_")
    since = since_time(args.since) if args.since else None
    done = export_feedback(workspace, args.model, out, since, args.version, args.min_count, args.holdout)
    print(
        f"tunefactory: {done.rated} rated chat answers of {args.model} ({done.held_out} held out for evaluation"
        + (f", {done.plain_completions_skipped} plain completions left out" if done.plain_completions_skipped else "")
        + ")"
    )
    for name, path in done.files.items():
        print(f"  {name}: {path}")
    print(f"  registry: {out / 'dataset_info.json'} (a spec's dataset.registry; dataset.names from the list above)")
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
    api.add_argument(
        "--workspace",
        default="workspace",
        help="whose registry resolves MODEL@ALIAS, and whose MLflow --record writes to",
    )
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
    api.add_argument(
        "--record",
        action="store_true",
        help="keep every answer as an MLflow trace and take ratings at /v1/ratings (docs/feedback-loop.md)",
    )
    api.set_defaults(handler=command_api)
    feedback = commands.add_parser("feedback", help="what users rated (tunefactory api --record) as training data")
    feedback_commands = feedback.add_subparsers(dest="feedback_command", required=True)
    export = feedback_commands.add_parser("export", help="rated answers as KTO and DPO sets, LLaMA-Factory format")
    export.add_argument("model", help="the served model's name (its answers' experiment is NAME-answers)")
    export.add_argument("--workspace", default="workspace", help="whose MLflow holds the recorded answers")
    export.add_argument(
        "--out", help="folder for the files and their dataset_info.json (default: WORKSPACE/feedback/MODEL)"
    )
    export.add_argument(
        "--since", help="only answers from this time on (ISO date or date and time; local time if no zone)"
    )
    export.add_argument("--version", help="only answers of this registry version of the model")
    export.add_argument(
        "--min-count", type=int, default=1, help="refuse with fewer rated answers than this (default 1)"
    )
    export.add_argument(
        "--holdout", type=float, default=0.2, help="share of rated answers kept out for evaluation, by trace id (0.2)"
    )
    export.set_defaults(handler=command_feedback_export)
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
