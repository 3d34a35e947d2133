"""`make bench-data`: templating and tokenizing a large chat set, against TRL's SFTTrainer preparing it.

    python -m tasks.tools.bench_data --root workspace/bench-data --rows 200000 [--rows 1000000 --no-trl]

For each size it writes a sharegpt JSON Lines file of generated multi-turn chats (turn counts and
message lengths spread like real chat exports: log-normal lengths, most chats short, a long
tail), registered in a dataset_info.json beside it, then measures:

  (a) `tunefactory prepare` on it, cold (fresh workspace and datasets cache): the whole command's
      wall time, the template and tokenize stages' own time, and the peak memory of the data worker
      processes (RSS sampled every 0.2 s and PSS every 2 s, each summed over the worker and its map
      processes);
  (b) the same command again, warm: the tokenized set is reused;
  (c) TRL: `load_dataset("json")` and `SFTTrainer(...)` at SFTConfig's defaults (ChatML
      conversion, tokenization, truncation to 1024), in a process of its own, timed and sampled the same way.

Both sides use SmolLM2's tokenizer and chat template and cut at 1024 tokens. The last line is
`ratio=` (TRL's time over the cold command's). Prints figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]


def generate_chats(path: Path, rows: int, seed: int = 0) -> None:
    """Multi-turn sharegpt chats: 1 to 8 exchanges (geometric), log-normal message lengths, some system prompts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "el", "or", "us", "ip", "qua", "sh"]
    words = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(6000)})
    vocabulary = np.array(words + ["the", "a", "is", "of", "and", "to", "in", "it", "you", "that"] * 40)

    def sentence(mean_words: float, sigma: float, cap: int) -> str:
        count = int(np.clip(rng.lognormal(np.log(mean_words), sigma), 1, cap))
        return " ".join(rng.choice(vocabulary, size=count)) + "."

    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            turns = []
            for _ in range(min(int(rng.geometric(0.5)), 8)):
                turns.append({"from": "human", "value": sentence(20, 0.9, 600)})
                turns.append({"from": "gpt", "value": sentence(70, 0.9, 1500)})
            row = {"conversations": turns}
            if rng.random() < 0.2:
                row["system"] = sentence(12, 0.5, 80)
            handle.write(json.dumps(row) + "\n")


def tokenizer_model(root: Path) -> Path:
    """A model directory with SmolLM2's tokenizer and a config: what the data stages read of a model."""
    directory = root / "smollm2-tokenizer"
    if (directory / "config.json").is_file():
        return directory
    from transformers import AutoTokenizer, LlamaConfig

    from tasks.stages.materialize_model import packaged_gguf

    gguf = packaged_gguf("packaged:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(directory)  # fmt: skip
    return directory


class PeakMemory:
    """Samples the memory of a process and its descendants that match `marker` (or all of them) until stopped.

    Two sums are kept: resident set sizes (RSS: pages shared between the worker and its forked
    map processes are counted once per process) and proportional set sizes (PSS: each shared page
    split between the processes that share it), whose sum is what the processes take of the machine.
    """

    def __init__(self, process: subprocess.Popen, marker: str | None):
        self.root, self.marker, self.done = psutil.Process(process.pid), marker, False
        self.peak_rss = self.peak_pss = 0
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        tick = 0
        while not self.done:
            # PSS costs the kernel a walk of the page tables (tens of ms a process): every 2 s,
            # so that measuring does not take the CPU from what is measured; RSS every 0.2 s
            with_pss, tick = tick % 10 == 0, tick + 1
            rss = pss = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for process in processes:
                try:
                    if self.marker is None or self.marker in " ".join(process.cmdline()):
                        rss += process.memory_info().rss
                        pss += process.memory_full_info().pss if with_pss else 0
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(0.2)

    def stop(self) -> tuple[float, float]:
        """Peak summed RSS and peak summed PSS, in MiB."""
        self.done = True
        self.thread.join()
        return self.peak_rss / 2**20, self.peak_pss / 2**20


def timed(command: list[str], env: dict[str, str], marker: str | None) -> tuple[float, tuple[float, float], str]:
    """Run a command; its wall time, the peak (RSS, PSS) MiB of its matching processes, and its output."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(process, marker)
    output, _ = process.communicate()
    peak = memory.stop()
    if process.returncode != 0:
        sys.exit(f"bench-data: {' '.join(command)} failed:\n{output[-3000:]}")
    return time.perf_counter() - started, peak, output


def stage_seconds(workspace: Path) -> dict[str, float]:
    """The template and tokenize stages' build times, from their manifests."""
    found = {}
    for stage in ("template", "tokenize"):
        manifests = sorted((workspace / "stages" / stage).glob("*/manifest.json"), key=os.path.getmtime)
        found[stage] = json.loads(manifests[-1].read_text())["duration_s"] if manifests else float("nan")
    return found


def measure_tunefactory(root: Path, rows: int, model: Path, data: Path) -> dict[str, float]:
    workspace, cache = root / f"workspace-{rows}", root / f"hf-cache-{rows}"
    shutil.rmtree(workspace, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    spec = {
        "name": f"bench-data-{rows}",
        "workspace": str(workspace),
        "model": {"name_or_path": str(model)},
        "dataset": {"names": ["chat"], "registry": str(data / "dataset_info.json")},
        "tokenize": {"cutoff_len": 1024},
    }
    spec_path = root / f"spec-{rows}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache)}
    env.pop("PREFECT_API_URL", None)  # the command's own temporary server
    command = [sys.executable, "-m", "flows.cli", "prepare", str(spec_path)]
    cold, (rss, pss), _ = timed(command, env, "tasks.workers.data")
    stages = stage_seconds(workspace)
    warm, _, output = timed(command, env, None)
    assert "reused" in output, "the warm run reuses the data stages"
    return {"cold_s": cold, "warm_s": warm, "rss_mib": rss, "pss_mib": pss, **{f"{k}_s": v for k, v in stages.items()}}


def trl_side(data_file: str, model_dir: str) -> None:
    """(c), in its own process: what SFTTrainer does to a dataset before its first step."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(model_dir))  # tiny: only its presence is needed
    started = time.perf_counter()
    dataset = load_dataset("json", data_files=data_file, split="train")
    loaded = time.perf_counter()
    args = SFTConfig(output_dir=str(Path(data_file).parent / "trl-out"), report_to=[], use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - started, "prepare_s": done - loaded, "rows": len(trainer.train_dataset)}))


def measure_trl(root: Path, rows: int, model: Path, data_file: Path) -> dict[str, float]:
    cache = root / f"hf-cache-trl-{rows}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache)}
    command = [sys.executable, "-m", "tasks.tools.bench_data", "--trl-side", str(data_file), str(model)]
    wall, (rss, pss), output = timed(command, env, None)
    figures = json.loads(output.strip().splitlines()[-1])
    return {"wall_s": wall, "rss_mib": rss, "pss_mib": pss, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="workspace/bench-data")
    parser.add_argument("--rows", type=int, action="append", help="dataset sizes (default 200000)")
    parser.add_argument("--no-trl", action="store_true", help="measure tunefactory only")
    parser.add_argument("--trl-side", nargs=2, metavar=("DATA", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_side:
        return trl_side(*args.trl_side)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    model = tokenizer_model(root)
    for rows in args.rows or [200_000]:
        data = root / f"data-{rows}"
        data_file = data / "chat.jsonl"
        if not data_file.is_file():
            data.mkdir(exist_ok=True)
            partial = data_file.with_suffix(".partial")  # an interrupted run leaves no half file behind
            generate_chats(partial, rows)
            partial.rename(data_file)
        (data / "dataset_info.json").write_text(
            json.dumps({"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"system": "system"}}})
        )
        size = data_file.stat().st_size / 2**20
        print(f"{rows} chats, {size:.0f} MiB of JSON Lines ({data_file})", flush=True)
        ours = measure_tunefactory(root, rows, model, data)
        print(
            f"  tunefactory prepare, cold: {ours['cold_s']:.1f}s ({rows / ours['cold_s']:.0f} rows/s; stages: "
            f"template {ours['template_s']:.1f}s, tokenize {ours['tokenize_s']:.1f}s), "
            f"data workers' peak memory: {ours['pss_mib']:.0f} MiB PSS ({ours['rss_mib']:.0f} MiB summed RSS); "
            f"warm re-run {ours['warm_s']:.1f}s",
            flush=True,
        )
        if args.no_trl:
            continue
        trl = measure_trl(root, rows, model, data_file)
        print(
            f"  TRL SFTTrainer at its defaults: {trl['wall_s']:.1f}s ({rows / trl['wall_s']:.0f} rows/s; "
            f"load_dataset {trl['load_s']:.1f}s, SFTTrainer preparation {trl['prepare_s']:.1f}s), "
            f"peak memory {trl['pss_mib']:.0f} MiB PSS ({trl['rss_mib']:.0f} MiB summed RSS)",
            flush=True,
        )
        print(f"ratio={trl['wall_s'] / ours['cold_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
