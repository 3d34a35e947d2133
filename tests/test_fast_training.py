"""The fast training path: packed rows keep examples apart and learn what padded batches learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tasks.components.chat_encoding import tokenize_examples
from tasks.components.modeling import IGNORE_INDEX, ComputeSetup, compute_setup, load_model, pad_batch, supervised_loss
from tasks.components.packing import pack_rows, packed_batch, padded_batch
from tasks.contracts.spec_sections import TrainSpec
from tasks.contracts.worker_configs import TrainJob, Weights
from tasks.dataset.jsonl import read_jsonl


def chat_examples(count: int) -> list[dict]:
    rng = random.Random(3)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]
    words += ["Nova", "from", "Acme", "Labs", "explains", "packing"]
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 12)))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(3, 30)))},
            ]
        }
        for _ in range(count)
    ]


def test_pack_rows_places_every_example_once_within_capacity():
    lengths = [random.Random(i).randint(1, 90) for i in range(57)] + [130]
    rows = pack_rows(lengths, capacity=100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [57] in rows, "an example longer than a row gets a row to itself"
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows if row != [57])
    assert len(rows) <= sum(lengths) / 100 + 3, "first fit leaves little room unused"


def test_packed_examples_see_only_themselves(tiny_model: Path, tokenizer):
    """Each example's loss and logits are the same packed into one row as alone in its own row."""
    columns, _ = tokenize_examples(tokenizer, chat_examples(6), cutoff_len=128, train_on_prompt=True)
    seqs, labels = columns["input_ids"], columns["labels"]
    model = load_model(tiny_model).eval()
    with torch.no_grad():
        ids, positions, target = packed_batch(seqs, labels, capacity=10_000, pad_id=0, multiple=64)
        assert ids.shape == (1, 64 * -(-sum(map(len, seqs)) // 64)), "one row, width rounded up to 64"
        packed_sum, packed_count = supervised_loss(model, ids, None, target, positions)
        packed_logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        alone_sum, alone_count = 0.0, 0
        start = 0
        order = pack_rows([len(s) for s in seqs], 10_000)[0]
        for i in order:
            row_ids, row_mask, row_target = pad_batch([seqs[i]], [labels[i]], 0)
            loss, count = supervised_loss(model, row_ids, row_mask, row_target)
            alone_sum, alone_count = alone_sum + float(loss), alone_count + count
            alone_logits = model(input_ids=row_ids).logits[0]
            torch.testing.assert_close(packed_logits[start : start + len(seqs[i])], alone_logits, atol=1e-4, rtol=1e-4)
            assert positions[0, start] == 0 and target[0, start] == IGNORE_INDEX
            start += len(seqs[i])
    assert packed_count == alone_count, "with train_on_prompt, no example's first token is a target"
    assert float(packed_sum) == pytest.approx(alone_sum, rel=1e-5)


def test_padded_rows_need_no_attention_mask(tiny_model: Path, tokenizer):
    columns, _ = tokenize_examples(tokenizer, chat_examples(5), cutoff_len=128, train_on_prompt=False)
    model = load_model(tiny_model).eval()
    with torch.no_grad():
        ids, mask, target = pad_batch(columns["input_ids"], columns["labels"], 0)
        masked, count = supervised_loss(model, ids, mask, target)
        ids, target = padded_batch(columns["input_ids"], columns["labels"], 0, multiple=64)
        assert ids.shape[1] % 64 == 0
        unmasked, same_count = supervised_loss(model, ids, None, target)
    assert same_count == count
    assert float(unmasked) == pytest.approx(float(masked), rel=1e-5)


def run_train_worker(tiny_model: Path, tokenizer, out: Path, **train) -> list[dict]:
    from datasets import Dataset

    from tasks.workers import train as train_worker

    columns, _ = tokenize_examples(tokenizer, chat_examples(24), cutoff_len=128, train_on_prompt=False)
    Dataset.from_dict(columns).save_to_disk(str(out / "data" / "train"))
    spec = TrainSpec(num_epochs=2, batch_size=6, learning_rate=2e-3, logging_steps=1, lora={"rank": 4, "alpha": 8})
    config = TrainJob(
        **spec.model_copy(update=train).model_dump(),
        start=Weights(model_dir=str(tiny_model)),
        tokenizer_path=str(tiny_model),
        dataset_dir=str(out / "data"),
        output_dir=str(out / "train"),
        cutoff_len=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    train_worker.train(config)
    return read_jsonl(out / "train" / "loss_history.jsonl")


def test_packed_training_learns_what_padded_training_learns(tiny_model: Path, tokenizer, tmp_path: Path, capsys):
    padded = run_train_worker(tiny_model, tokenizer, tmp_path / "padded", packing=False)
    packed = run_train_worker(tiny_model, tokenizer, tmp_path / "packed", packing=True, gradient_checkpointing=True)
    assert len(packed) == len(padded) == 8
    assert padded[-1]["loss"] < padded[0]["loss"], "it learned"
    for a, b in zip(padded, packed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), f"step {a['step']}"
    events = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "@@" in line]
    starts = [e for e in events if e["type"] == "start"]
    assert [e["packing"] for e in starts] == [False, True]
    assert [e["gradient_checkpointing"] for e in starts] == [False, True]
    done = [e["metrics"] for e in events if e["type"] == "done"]
    columns, _ = tokenize_examples(tokenizer, chat_examples(24), cutoff_len=128, train_on_prompt=False)
    real_tokens = 2 * sum(map(len, columns["input_ids"]))  # 2 epochs, padding not counted
    assert done[0]["train_tokens"] == done[1]["train_tokens"] == real_tokens
    assert all(d["train_tokens_per_second"] > 0 and d["peak_memory_mb"] > 0 for d in done)


@pytest.fixture(scope="module")
def fp32_losses(tiny_model: Path, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_train_worker(tiny_model, tokenizer, tmp_path_factory.mktemp("fp32"), packing=False)


# each setting the GPU path takes by default, set explicitly on CPU: what it changes, what the
# worker says it used, and how far its loss curve may stray from the fp32 run's (measured gap in
# the comment; the tolerance leaves room for other CPUs)
# (bf16: test_auto_on_a_cpu_with_bf16_trains_in_bf16_and_says_so)
GPU_PATH_SETTINGS = {
    # inductor's kernels; below the 5 decimals the loss history keeps, measured
    "compiled-layers": ({"torch_compile": True}, {"torch_compile": True}, 1e-4),
    "fused-adamw": ({"fused_optimizer": True}, {"fused_optimizer": True}, 1e-5),
    # SDPA with a per-example mask from the position ids, no FlashAttention: below 5 decimals
    "packing-sdpa": ({"packing": True}, {"packing": True, "attention": "sdpa"}, 1e-4),
}


@pytest.mark.parametrize("setting", list(GPU_PATH_SETTINGS))
def test_a_gpu_path_setting_runs_on_cpu_learns_and_matches_fp32(
    setting, fp32_losses, tiny_model: Path, tokenizer, tmp_path: Path, capsys
):
    train, reported, tolerance = GPU_PATH_SETTINGS[setting]
    capsys.readouterr()
    losses = run_train_worker(tiny_model, tokenizer, tmp_path, **{"packing": False, **train})
    events = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "@@" in line]
    (start,) = [e for e in events if e["type"] == "start"]
    assert {key: start[key] for key in reported} == reported, "the worker used the setting"
    assert start["device"] == "cpu"
    assert losses[-1]["loss"] < losses[0]["loss"], "it learned"
    gaps = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(fp32_losses, losses, strict=True)]
    print(f"{setting}: largest relative gap to fp32 {max(gaps):.2e}")
    assert max(gaps) <= tolerance, f"{setting}: loss strays {max(gaps):.2e} from fp32 (allowed {tolerance:.0e})"


def test_compute_type_auto_is_bf16_where_the_cpu_computes_it_and_a_gpu_keeps_its_own(monkeypatch):
    monkeypatch.delenv("TUNEFACTORY_CPU_BF16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert compute_setup("auto").name == expected
        assert compute_setup("fp32") == ComputeSetup(torch.device("cpu"), None, "fp32"), "the spec can always say"
    monkeypatch.setenv("TUNEFACTORY_CPU_BF16", "0")  # the detection forced off, on a CPU with bf16
    assert compute_setup("auto") == ComputeSetup(torch.device("cpu"), None, "fp32")
    monkeypatch.setenv("TUNEFACTORY_CPU_BF16", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda v=supported: v)
        assert compute_setup("auto").autocast_dtype == expected


def test_auto_on_a_cpu_with_bf16_trains_in_bf16_and_says_so(monkeypatch, fp32_losses, tiny_model: Path, tokenizer,
                                                              tmp_path: Path, capsys):  # fmt: skip
    """bf16 autocast and the frozen base held in bf16 under LoRA, as `auto` resolves on a CPU with bf16
    arithmetic (4.0e-5 measured from the fp32 loss curve; allowed 1e-3)."""
    monkeypatch.setenv("TUNEFACTORY_CPU_BF16", "1")  # as the detection answers on AVX512-BF16 or AMX
    capsys.readouterr()
    losses = run_train_worker(tiny_model, tokenizer, tmp_path, compute_type="auto", packing=False)
    events = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "@@" in line]
    (start,) = [e for e in events if e["type"] == "start"]
    assert (start["compute_type"], start["frozen_dtype"]) == ("bf16", "bfloat16"), "logged as resolved_compute_type"
    gaps = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(fp32_losses, losses, strict=True)]
    print(f"bf16: largest relative gap to fp32 {max(gaps):.2e}")
    assert max(gaps) <= 1e-3, f"bf16: loss strays {max(gaps):.2e} from fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_defaults_on_cuda_learn_and_match_fp32(tiny_model: Path, tokenizer, tmp_path: Path, capsys):
    """On a GPU the defaults are the fast path: bf16 with a bf16 frozen base, compiled layers,
    fused AdamW, packing where FlashAttention 2 is installed; against the same run in fp32."""
    fp32 = run_train_worker(tiny_model, tokenizer, tmp_path / "fp32", compute_type="fp32", torch_compile=False,
                            fused_optimizer=False, packing=False)  # fmt: skip
    capsys.readouterr()
    fast = run_train_worker(tiny_model, tokenizer, tmp_path / "fast")
    events = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "@@" in line]
    (start,) = [e for e in events if e["type"] == "start"]
    assert start["device"] == "cuda" and start["compute_type"] == "bf16" and start["frozen_dtype"] == "bfloat16"
    assert start["torch_compile"] and start["fused_optimizer"]
    assert fast[-1]["loss"] < fast[0]["loss"], "it learned"
    gaps = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(fp32, fast, strict=True)]
    assert max(gaps) <= 5e-2, f"the GPU defaults stray {max(gaps):.2e} from fp32"


def test_a_memory_budget_splits_the_step_and_the_loss_curve_stays(fp32_losses, tiny_model: Path, tokenizer,
                                                                 tmp_path: Path, capsys):  # fmt: skip
    """train.max_memory below the step's estimate: each batch of 6 becomes micro-batches whose
    gradients add up to the same step."""
    capsys.readouterr()
    # 1.3 GB planned for, after the headroom: less than the step needs unsplit
    losses = run_train_worker(tiny_model, tokenizer, tmp_path, packing=False, max_memory="1.444GB")
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line.split(" ", 1)[1]) for line in lines if "@@" in line]
    (start,) = [e for e in events if e["type"] == "start"]
    assert start["micro_batch_split"] > 1 and not start["gradient_checkpointing"]
    assert start["memory_estimate_mb"] <= 0.9 * start["memory_budget_mb"] and start["memory_budget_mb"] == round(
        1.444e9 / 2**20
    )
    notes = [e["message"] for e in events if e["type"] == "note" and e["message"].startswith("memory:")]
    assert notes and f"each batch in {start['micro_batch_split']} micro-batches" in notes[0]
    for a, b in zip(fp32_losses, losses, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}: the same step, split"


def test_a_budget_nothing_fits_is_refused_with_the_numbers(tiny_model: Path, tokenizer, tmp_path: Path):
    from tasks.contracts.child_process import WorkerError

    with pytest.raises(WorkerError, match=r"even with one example per micro-batch .* GB is available "
                                          r"\(train.max_memory\), 90% of it planned for: "
                                          r"lower tokenize.cutoff_len"):  # fmt: skip
        run_train_worker(tiny_model, tokenizer, tmp_path, max_memory="200MB")


def test_the_memory_plan_splits_first_then_checkpoints_then_refuses():
    from tasks.components.memory_plan import HEADROOM, StepShape, plan_memory, step_bytes

    shape = StepShape(layers=30, hidden=576, intermediate=1536, heads=9, vocab=49152, weight_bytes=540_000_000,
                      trainable=4_900_000, compute_bytes=4, rows=8, width=512, tokens=8 * 512, supervised=2400,
                      device="cpu", attention_probs=True)  # fmt: skip

    def budget(estimate: float) -> float:  # the budget whose planned part (headroom kept free) is `estimate`
        return estimate / (1 - HEADROOM)

    whole = step_bytes(shape, 1, False)
    assert 12e9 < whole < 16e9, "the LLaMA-Factory-data step that peaked at 15 GB resident"
    assert plan_memory(shape, budget(whole), False).split == 1
    halved = plan_memory(shape, budget(step_bytes(shape, 2, False)), False)
    assert (halved.split, halved.gradient_checkpointing) == (2, False)
    tight = plan_memory(shape, budget(step_bytes(shape, 8, False)) - 1, False)
    assert tight.gradient_checkpointing and tight.estimate_bytes < step_bytes(shape, 8, False)
    assert plan_memory(shape, budget(step_bytes(shape, 8, True)) - 1, False) is None


@pytest.mark.parametrize(
    "quantized",
    [{"quantization_type": "fp4", "double_quantization": False}, {"quantization_bit": 8}],
    ids=["4-bit-fp4", "8-bit"],
)
def test_qlora_quantizes_the_base_as_asked_on_cpu_and_learns(quantized, tiny_model: Path, tokenizer, tmp_path, capsys):
    capsys.readouterr()
    lora = {"rank": 4, "alpha": 8, **quantized}
    losses = run_train_worker(tiny_model, tokenizer, tmp_path, finetuning_type="qlora", lora=lora)
    events = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "@@" in line]
    (start,) = [e for e in events if e["type"] == "start"]
    assert start["quantized_modules"] == 14, "every linear layer of the 2 decoder layers held by bitsandbytes"
    assert losses[-1]["loss"] < losses[0]["loss"], "the adapters learned on the quantized base"


@pytest.mark.parametrize("bits, most", [(4, 1 / 7), (8, 1 / 3.5)], ids=["4-bit-nf4", "8-bit"])
def test_the_qlora_base_holds_its_decoder_weights_in_4_or_8_bits(bits, most, tiny_model: Path, tmp_path: Path):
    """The memory a quantized base saves: its decoder layers' linear weights in an eighth (4-bit) or a
    quarter (8-bit) of their fp32 bytes, quantization constants included; the adapters stay fp32."""
    from tasks.components.finetuning_methods import trainable_model

    job = TrainJob(finetuning_type="qlora", lora={"rank": 4, "alpha": 8, "quantization_bit": bits},
                   start=Weights(model_dir=str(tiny_model)), tokenizer_path=str(tiny_model), dataset_dir=str(tmp_path),
                   cutoff_len=64, pad_token_id=0, output_dir=str(tmp_path))  # fmt: skip
    model = trainable_model(job, torch.device("cpu"))
    layers = [m for name, m in model.named_modules() if ".layers." in name and hasattr(m, "base_layer")]
    held = sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size() for m in layers)
    held += sum(t.numel() * t.element_size() for m in layers for t in quantization_constants(m.base_layer))
    full = sum(m.in_features * m.out_features * 4 for m in layers)
    assert len(layers) == 14 and held <= most * full, f"{held} bytes held against {full} in fp32"
    adapters = [p for name, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)


def quantization_constants(layer) -> list[torch.Tensor]:
    """What a bitsandbytes layer keeps beside its packed weight to undo the quantization."""
    state = getattr(layer.weight, "quant_state", None)  # 4-bit: absmax (itself quantized with double quantization)
    if state is not None:
        tensors = [state.absmax] + ([state.state2.absmax] if state.nested else [])
        return tensors
    return [t for t in (getattr(layer.weight, "SCB", None),) if t is not None]  # 8-bit: a scale per row


def test_a_quantization_bitsandbytes_cannot_do_is_refused_by_name():
    from tasks.components.finetuning_methods import check_quantization
    from tasks.contracts.child_process import WorkerError

    check_quantization(4, "nf4", True, torch.device("cpu"))  # what the demo's qlora uses, on this CPU
    with pytest.raises(WorkerError, match=r"train.lora: bitsandbytes [\d.]+ cannot train on a 4-bit nf3 base on cpu"):
        check_quantization(4, "nf3", False, torch.device("cpu"))


def test_an_int8_forward_logs_no_cast_warning(tiny_model: Path, tmp_path: Path, caplog):
    """bitsandbytes' int8 matmul logged "MatMul8bitLt: inputs will be cast from torch.float32 to
    float16" for every 8-bit layer at every forward (14 lines a step here); it is dropped, and a
    warning of its own from the same module still gets through."""
    import logging

    from tasks.components.finetuning_methods import quantized_modules, trainable_model

    job = TrainJob(finetuning_type="qlora", lora={"rank": 4, "alpha": 8, "quantization_bit": 8},
                   start=Weights(model_dir=str(tiny_model)), tokenizer_path=str(tiny_model), dataset_dir=str(tmp_path),
                   cutoff_len=64, pad_token_id=0, output_dir=str(tmp_path))  # fmt: skip
    model = trainable_model(job, torch.device("cpu"))
    assert quantized_modules(model) == 14
    with caplog.at_level(logging.WARNING):
        model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
        logging.getLogger("bitsandbytes.autograd._functions").warning("another warning")
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "inputs will be cast" in m], messages
    assert "another warning" in messages
