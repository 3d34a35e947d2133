"""What `tunefactory api --record` costs a client: answer latency with and without recording.

    python -m tasks.tools.bench_recording --root workspace/bench-recording [--requests 40]   (or: make bench-recording)

Two servers of the packaged SmolLM2-135M-Instruct run side by side on loopback, one recording into
a fresh workspace's MLflow, one not; the same chat requests (greedy, 24 new tokens) go to them in
turn, A B B A ..., so that a slower minute of the machine hits both alike. Printed per server: the
median and 90th percentile latency, the mean with its 95% interval, and how many answers reached
MLflow once the requests ended. Each request waits for its answer before the next is sent: the
figure is a user's latency, not the server's throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from tasks.tools.api_process import free_port, start, stop, wait_healthy

REQUESTS = 40
PROMPTS = ["Who are you?", "What is the capital of France?", "Name three colours.", "What is 12 times 3?"]


def smollm2_directory(root: Path) -> Path:
    from tasks.stages.materialize_model import packaged_gguf
    from tasks.workers.gguf import convert_gguf

    model_dir = root / "smollm2-135m-instruct"
    if not (model_dir / "config.json").is_file():
        convert_gguf(packaged_gguf("packaged:smollm2-135m-instruct"), model_dir)
    return model_dir


def ask(url: str, prompt: str) -> tuple[float, str]:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}
    began = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return time.perf_counter() - began, response.json()["id"]


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    mean, spread = statistics.fmean(ordered), statistics.stdev(ordered) / len(ordered) ** 0.5
    return {
        "median_s": statistics.median(ordered),
        "p90_s": ordered[int(0.9 * (len(ordered) - 1))],
        "mean_s": mean,
        "mean_low_s": mean - 1.96 * spread,
        "mean_high_s": mean + 1.96 * spread,
    }


def recorded_count(workspace: Path, ids: list[str]) -> int:
    import mlflow

    from tasks.runtime.answer_records import answers_experiment

    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(answers_experiment("smollm2"))
    if experiment is None:
        return 0
    traces = client.search_traces(locations=[experiment.experiment_id], max_results=len(ids) + 10)
    return len({t.info.tags.get("completion_id") for t in traces} & set(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("workspace/bench-recording"))
    parser.add_argument("--requests", type=int, default=REQUESTS)
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_directory(root)
    workspace = root / f"workspace-{int(time.time())}"  # a fresh store each run: the count below is this run's
    ports = {"plain": free_port(), "recording": free_port()}
    options = {"plain": (), "recording": ("--record", "--workspace", str(workspace))}
    logs = {name: root / f"server-{port}.log" for name, port in ports.items()}
    servers = {
        name: start(str(model_dir), port, logs[name], "--served-model-name", "smollm2", *options[name])
        for name, port in ports.items()
    }
    try:
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for name, url in urls.items():
            wait_healthy(url, servers[name], logs[name])
            ask(url, PROMPTS[0])  # warm: the first answer loads the model
        latencies: dict[str, list[float]] = {name: [] for name in urls}
        ids: list[str] = []
        for i in range(args.requests):
            order = ("plain", "recording") if i % 2 == 0 else ("recording", "plain")
            for name in order:
                seconds, completion_id = ask(urls[name], PROMPTS[i % len(PROMPTS)])
                latencies[name].append(seconds)
                if name == "recording":
                    ids.append(completion_id)
    finally:
        for process in servers.values():
            stop(process)  # the recording server writes what is queued before it exits
    results = {name: summary(values) for name, values in latencies.items()}
    results["recording"]["recorded"] = recorded_count(workspace, ids)
    results["recording"]["requests"] = len(ids)
    print(f"{'server':<10} {'median s':>9} {'p90 s':>7} {'mean s [95% interval]':>28}  recorded")
    for name, row in results.items():
        interval = f"{row['mean_s']:.3f} [{row['mean_low_s']:.3f}, {row['mean_high_s']:.3f}]"
        recorded = f"{row['recorded']}/{row['requests']}" if "recorded" in row else "-"
        print(f"{name:<10} {row['median_s']:>9.3f} {row['p90_s']:>7.3f} {interval:>28}  {recorded}")
    (root / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
