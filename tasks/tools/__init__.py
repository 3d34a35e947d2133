"""Command-line features beside the pipeline: chat with a model, compare runs, the benchmarks."""
