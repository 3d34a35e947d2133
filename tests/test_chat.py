"""`tunefactory chat`: a scripted terminal session with an exported model and with an adapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.dataset.registry import DataError
from tasks.tools.chat import resolve_chat_model

ROOT = Path(__file__).resolve().parents[1]


def chat(path: Path, lines: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "chat", str(path), "--max-new-tokens", "5"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_chat_streams_answers_and_keeps_going_until_exit(tiny_model: Path):
    done = chat(tiny_model, "Who are you?\n/reset\nAnd now?\n/exit\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("assistant> ") == 2
    assert f"chatting with {tiny_model}" in done.stdout


def test_chat_loads_an_adapter_on_its_base(tiny_model: Path, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "adapter")
    assert resolve_chat_model(tmp_path) == (tiny_model, tmp_path / "adapter")
    done = chat(tmp_path, "hi\n")  # ends at end of input, like Ctrl-D
    assert done.returncode == 0, done.stderr[-2000:]
    assert "assistant> " in done.stdout


def test_chat_refuses_a_directory_without_a_model(tmp_path: Path):
    with pytest.raises(DataError, match="not a model directory"):
        resolve_chat_model(tmp_path)
    done = chat(tmp_path, "")
    assert done.returncode == 2 and "not a model directory" in done.stderr and "Traceback" not in done.stderr
