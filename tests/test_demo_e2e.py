"""The real demo, end to end: SmolLM2-135M learns its new identity and keeps its general answers.

Slow (about 8 minutes on 2 CPU cores); runs in CI through `make test`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared_inputs import llama_cpp_greedy, llama_cpp_or_fail_in_ci

ROOT = Path(__file__).resolve().parents[1]

TIME_REPORT = re.compile(r"Time: ([\d.]+)s in all; model compute ([\d.]+)s .*; orchestration ([\d.]+)s")


def stage_manifest(workspace: Path, stage: str) -> dict:
    (path,) = (workspace / "stages" / stage).glob("*/manifest.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_demo_teaches_identity_without_breaking_general_answers(tmp_path: Path):
    workspace = tmp_path / "workspace"
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "deployments/self_cognition.yaml",
        "--set",
        f"workspace={workspace}",
    ]
    # as a user runs it: compute_type auto is bf16 where this CPU has bf16 arithmetic
    env = {k: v for k, v in os.environ.items() if k != "TUNEFACTORY_CPU_BF16"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Evaluation (before -> after)" in done.stdout and "Exported model:" in done.stdout
    _, compute, orchestration = map(float, TIME_REPORT.search(done.stdout).groups())
    assert compute > 0 and orchestration > 0, "the report separates the workers' time from the rest"

    metrics = stage_manifest(workspace, "evaluate")["metrics"]
    assert metrics["base_identity_hit_rate"] == 0.0
    assert metrics["tuned_identity_hit_rate"] >= 0.9
    assert metrics["tuned_control_accuracy"] >= metrics["base_control_accuracy"]
    assert metrics["tuned_control_identity_leak"] == 0.0

    # the exported, merged model itself answers with its new identity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = workspace / "models" / "self-cognition"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Nova" in answer or "Acme" in answer, answer

    # its q8_0 GGUF (export.formats): checked against the merged model by the export, a quarter of its size;
    # that it answers as the model does is checked below with llama.cpp itself
    gguf = model_dir / "self-cognition-q8_0.gguf"
    export = stage_manifest(workspace, "export")["metrics"]
    assert export["gguf_logits_rel_diff"] <= export["gguf_logits_rtol"]
    assert gguf.stat().st_size < 0.3 * export["model_size_mb"] * 1e6, "q8_0: about a quarter of the f32 shards"

    # LoRA changed the adapted projections; embeddings and norms are the base model's
    base_dir = Path(stage_manifest(workspace, "model")["output_dir"]) / "model"
    base = load_file(base_dir / "model.safetensors")
    merged = {}
    for shard in model_dir.glob("*.safetensors"):
        merged.update(load_file(shard))
    assert not torch.equal(
        base["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    assert torch.equal(base["model.norm.weight"], merged["model.norm.weight"])

    # llama.cpp, the program the GGUF file is for (Ollama runs it), reads it, splits the prompt into the
    # tokenizer's ids and answers with the new identity too (last: without llama-cpp-python, a skip outside CI)
    llama_cpp = llama_cpp_or_fail_in_ci()
    llm = llama_cpp.Llama(model_path=str(gguf), verbose=False, n_ctx=512)
    try:
        prompt = inputs["input_ids"][0].tolist()
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == prompt
        cpp_answer = llm.detokenize(llama_cpp_greedy(llm, prompt, 30)).decode("utf-8", errors="replace")
    finally:
        llm.close()
    assert "Nova" in cpp_answer or "Acme" in cpp_answer, cpp_answer
