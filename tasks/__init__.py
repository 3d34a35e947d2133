"""Everything below the flow: each folder holds code that runs in one kind of process.

stages/      the Prefect tasks of the pipeline (flow process): key, launch a worker, record
runtime/     what the stage tasks stand on (flow process): stage outputs, MLflow, locks, servers
workers/     the child processes that do the heavy work (`python -m tasks.workers.<name>`)
components/  the torch and tokenizer parts the workers are built from
contracts/   what crosses between the two: spec sections, worker configs and events, manifests
dataset/     LLaMA-Factory's registry, sources and rows (read by both sides)
tools/       command-line features beside the pipeline: chat, comparison, benchmarks
"""
