"""A `.gguf` base model (`model.name_or_path`) that is corrupt or hostile is refused before stage one,
in one line naming the file; one that is read is one gguf's and transformers' readers read whole;
a conversion that would not fit in memory is refused with the numbers.

Cut short, a wrong magic, an unknown version, a value of an unknown type, text that is not UTF-8,
a tensor past the end and an array length of 2**62 go through `tunefactory run` (refused before
any Prefect or MLflow work); hypothesis mutates the bytes of a small valid GGUF (derandomized:
the same inputs every run). No model is converted here: tests/test_pipeline_flow.py converts one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flows.cli import main
from tasks.components.gguf_check import quick_reader_class
from tasks.contracts.gguf_file import check_conversion_memory, read_gguf_header
from tasks.contracts.packaged_models import ModelSourceError, packaged_gguf


def small_gguf(path: Path) -> bytes:
    """A valid GGUF of a few kB: texts, arrays of texts and numbers, a float32 and a float16 tensor."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch="llama")
    writer.add_string("general.name", "tiny")
    writer.add_uint32("llama.block_count", 1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_array("tokenizer.ggml.token_type", [1, 1, 1])
    writer.add_chat_template("{{ messages[0]['content'] }}")
    writer.add_tensor("token_embd.weight", np.arange(3 * 32, dtype=np.float32).reshape(3, 32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return small_gguf(tmp_path_factory.mktemp("gguf") / "valid.gguf")


def after_key(data: bytes, key: str) -> int:
    """The offset just past a metadata key's (or tensor name's) bytes."""
    return data.index(key.encode()) + len(key)


def patched(data: bytes, offset: int, layout: str, *values) -> bytes:
    new = struct.pack("<" + layout, *values)
    return data[:offset] + new + data[offset + len(new) :]


def tensor_offset_at(data: bytes, name: str, dims: int) -> int:
    return after_key(data, name) + 4 + 8 * dims + 4  # dimension count, dimensions, ggml type


DAMAGE = {  # a change to the valid file, and what the one-line refusal says
    "cut-in-header": (lambda d: d[:20], "too few for a GGUF header"),
    "cut-in-metadata": (lambda d: d[: after_key(d, "tokenizer.ggml.tokens") + 20], "cut short"),
    "cut-in-tensor-data": (lambda d: d[:-10], "runs past the end of the file"),
    "wrong-magic": (lambda d: b"GGML" + d[4:], "does not start with the GGUF magic bytes"),
    "version": (lambda d: patched(d, 4, "I", 9), "GGUF version 9; versions 2 and 3 are read"),
    "value-type": (lambda d: patched(d, after_key(d, "general.name"), "I", 13), "'general.name' has value type 13"),
    "not-utf8": (lambda d: d.replace(b"tiny", b"\xff\xfe\xfd\xfc"), "'general.name' is not UTF-8 text"),
    "tensor-past-end": (
        lambda d: patched(d, tensor_offset_at(d, "blk.0.attn_q.weight", 2), "Q", 2**40),
        "tensor 'blk.0.attn_q.weight' (2048 bytes at",
    ),
    "numbers-array-of-2**62": (  # gguf's GGUFReader loops on it for good
        lambda d: patched(d, after_key(d, "tokenizer.ggml.token_type") + 8, "Q", 2**62),
        "cut short: metadata 'tokenizer.ggml.token_type' runs past the end of the file",
    ),
    "texts-array-of-2**62": (
        lambda d: patched(d, after_key(d, "tokenizer.ggml.tokens") + 8, "Q", 2**62),
        "claims 4611686018427387904 texts",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_gguf_is_refused_before_stage_one_naming_the_file(
    damage: str, valid_gguf: bytes, tmp_path: Path, capsys, monkeypatch
):
    change, message = DAMAGE[damage]
    model = tmp_path / "model.gguf"
    model.write_bytes(change(valid_gguf))
    workspace = tmp_path / "ws"
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"workspace": str(workspace), "model": {"name_or_path": str(model)}}))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no Prefect server: none is needed
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tunefactory: model.name_or_path: {model}: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not workspace.exists(), "nothing ran"


MUTATION = st.one_of(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6).map(lambda o: ("set", o)),
    st.integers(0, 10_000).map(lambda n: ("cut", n)),
    st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=16)).map(lambda i: ("insert", i)),
)


def mutated(data: bytes, mutation) -> bytes:
    kind, how = mutation
    if kind == "cut":
        return data[: how % len(data)]
    if kind == "insert":
        at, extra = how
        return data[: at % len(data)] + extra + data[at % len(data) :]
    changed = bytearray(data)
    for at, value in how:
        changed[at % len(data)] = value
    return bytes(changed)


@settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(mutation=MUTATION)
@example(mutation=("set", []))  # the file as written: read, and read alike by both libraries
def test_mutated_gguf_bytes_are_refused_in_one_line_or_read_whole_by_both_readers(
    mutation, valid_gguf: bytes, tmp_path: Path
):
    from gguf import GGUFReader
    from transformers.integrations.gguf.reader import read_gguf_metadata

    path = tmp_path / "mutated.gguf"
    path.write_bytes(mutated(valid_gguf, mutation))
    try:
        header = read_gguf_header(path)
    except ModelSourceError as refused:
        assert str(refused).startswith(f"model.name_or_path: {path}: ") and "\n" not in str(refused)
        return
    reader = GGUFReader(path)  # every tensor's data is mapped here: it lies inside the file
    assert_read_alike(reader, quick_reader_class()(path))
    assert [t.name for t in reader.tensors] == [t.name for t in header.tensors]
    assert [t.n_elements for t in reader.tensors] == [t.elements for t in header.tensors]
    texts = {key: field.contents() for key, field in reader.fields.items() if field.types == [8]}
    assert texts == header.texts
    metadata, names = read_gguf_metadata(str(path))
    assert metadata["general.architecture"] == header.texts["general.architecture"]
    assert list(names) == [t.name for t in header.tensors]


def assert_read_alike(reader, quick) -> None:
    """The conversion's quicker reader (tasks/components/gguf_check.py) gives what gguf's own gives."""
    assert list(quick.fields) == list(reader.fields)
    for name, field in reader.fields.items():
        fast = quick.fields[name]
        assert (fast.offset, fast.data, fast.types) == (field.offset, field.data, field.types), name
        assert [(p.dtype, p.shape, p.tobytes()) for p in fast.parts] == [
            (p.dtype, p.shape, p.tobytes()) for p in field.parts
        ], name
    assert (quick.alignment, quick.data_offset) == (reader.alignment, reader.data_offset)
    for fast, tensor in zip(quick.tensors, reader.tensors, strict=True):
        assert (fast.name, fast.tensor_type, fast.n_bytes, fast.data_offset) == (
            tensor.name, tensor.tensor_type, tensor.n_bytes, tensor.data_offset
        )  # fmt: skip
        assert (fast.data.dtype, fast.data.shape, fast.data.tobytes()) == (
            tensor.data.dtype,
            tensor.data.shape,
            tensor.data.tobytes(),
        )


def test_a_conversion_larger_than_free_memory_is_refused_with_the_numbers():
    smollm2 = packaged_gguf("packaged:smollm2-135m-instruct")
    header = read_gguf_header(smollm2)
    assert header.texts["general.architecture"] == "llama" and header.parameters == 134_515_008
    check_conversion_memory(header, smollm2, available=2_000_000_000)  # fits
    with pytest.raises(ModelSourceError) as refused:
        check_conversion_memory(header, smollm2, available=200_000_000)
    assert str(refused.value) == (
        f"model.name_or_path: {smollm2}: converting it into safetensors needs about 1.25 GB "
        "(134,515,008 parameters in float32) and 0.20 GB is free; "
        "free some memory, or convert it on a larger machine and name that directory"
    )
