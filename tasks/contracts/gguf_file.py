"""A GGUF model file's header, read and checked before anything loads it.

`model.name_or_path` may name a `.gguf` file (the packaged SmolLM2 is one): `tunefactory run` reads
its header here before stage one, and the model stage again before converting it. The libraries
that load it (gguf's GGUFReader, transformers' reader) trust the file: a corrupt or hostile one
stops them with a bare ValueError, IndexError or UnicodeDecodeError, and an array that claims
2**62 numbers keeps GGUFReader looping for good. Here every length is held against the bytes
that are left, so a file is either refused in one line naming it, or one those readers read whole.
The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tasks.contracts.packaged_models import ModelSourceError

VERSIONS = (2, 3)  # what GGUFReader and transformers read; v1 counted in 32 bits
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# metadata value types (GGUFValueType): fixed-size ones by struct format; 8 is a string, 9 an array
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY, UINT32 = 8, 9, 4
SMALLEST_ENTRY = 8 + 4 + 1  # a metadata entry: key length, value type, one byte of value
SMALLEST_TENSOR = 8 + 4 + 8 + 4 + 8  # a tensor entry: name length, dimension count, one dimension, type, offset
WORKER_BASELINE_BYTES = 600_000_000  # torch, transformers, tokenizer: SmolLM2's measured peak less its tensors


class Refused(Exception):
    """Why a file is not a GGUF this can read (made a ModelSourceError naming the file)."""


class TensorEntry(NamedTuple):
    """A tensor as the file's table describes it; offset from the start of the data section."""

    name: str
    elements: int
    ggml_type: int
    offset: int
    size: int


@dataclass(frozen=True)
class GGUFHeader:
    """What the checks found: the text metadata (architecture, chat template) and the tensor table."""

    texts: dict[str, str]
    tensors: tuple[TensorEntry, ...]

    @property
    def parameters(self) -> int:
        return sum(tensor.elements for tensor in self.tensors)


class Cursor:
    """Reads little-endian values from the file, refusing any that would run past its end."""

    def __init__(self, data: mmap.mmap | bytes):
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, layout: str, what: str) -> tuple:
        size = struct.calcsize("<" + layout)
        if size > self.left():
            raise Refused(f"cut short: {what} runs past the end of the file ({len(self.data)} bytes)")
        values = struct.unpack_from("<" + layout, self.data, self.pos)
        self.pos += size
        return values

    def skip(self, size: int, what: str) -> None:
        if size > self.left():
            raise Refused(f"cut short: {what} runs past the end of the file ({len(self.data)} bytes)")
        self.pos += size

    def text(self, what: str) -> str:
        (length,) = self.take("Q", what)
        start = self.pos
        self.skip(length, what)
        try:
            return bytes(self.data[start : self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(f"{what} is not UTF-8 text") from None


def read_gguf_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file at `path`, every part checked; ModelSourceError names what is wrong."""
    try:
        with open(path, "rb") as file:
            if path.stat().st_size < 4 + 4 + 8 + 8:
                raise Refused(f"cut short: {path.stat().st_size} bytes, too few for a GGUF header (24)")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return parse_header(Cursor(data))
    except Refused as reason:
        raise ModelSourceError(f"model.name_or_path: {path}: {reason}") from None
    except OSError as exc:
        raise ModelSourceError(f"model.name_or_path: {path}: cannot be read ({exc.strerror})") from None


def parse_header(cursor: Cursor) -> GGUFHeader:
    (magic,) = cursor.take("4s", "the magic bytes")
    if magic != b"GGUF":
        raise Refused(f"does not start with the GGUF magic bytes b'GGUF' (it starts {magic!r}): not a GGUF file")
    version, tensor_count, entry_count = cursor.take("IQQ", "the version and counts")
    if version & 0xFFFF == 0 and version:
        raise Refused("a big-endian GGUF file; only little-endian ones are read")
    if version not in VERSIONS:
        raise Refused(f"GGUF version {version}; versions {' and '.join(map(str, VERSIONS))} are read")
    # before any loop: a count of 2**63 would keep a reader busy for good
    check_count(cursor, entry_count, SMALLEST_ENTRY, "metadata entries")
    check_count(cursor, tensor_count, SMALLEST_TENSOR, "tensors")
    texts, alignment = read_metadata(cursor, entry_count)
    tensors = [read_tensor_entry(cursor, index) for index in range(tensor_count)]
    check_tensor_data(tensors, data_start=-(-cursor.pos // alignment) * alignment, file_size=len(cursor.data))
    if not isinstance(texts.get("general.architecture"), str):
        raise Refused("no general.architecture text in its metadata")
    return GGUFHeader(texts, tuple(tensors))


def check_count(cursor: Cursor, count: int, smallest: int, what: str) -> None:
    if count * smallest > cursor.left():
        raise Refused(f"claims {count} {what}, more than its {len(cursor.data)} bytes can hold")


def check_tensor_data(tensors: list[TensorEntry], data_start: int, file_size: int) -> None:
    """Each tensor named once, its data inside the file (GGUFReader maps it; a short map fails there)."""
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name in seen:
            raise Refused(f"tensor {tensor.name!r} appears twice")
        seen.add(tensor.name)
        start = data_start + tensor.offset
        if start + tensor.size > file_size:
            raise Refused(
                f"tensor {tensor.name!r} ({tensor.size} bytes at {start}) runs past the end of the file "
                f"({file_size} bytes)"
            )


def read_metadata(cursor: Cursor, count: int) -> tuple[dict[str, str], int]:
    """The text values of the metadata (the rest is checked and skipped), and the data alignment."""
    texts: dict[str, str] = {}
    seen: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    for index in range(count):
        key = cursor.text(f"metadata key {index}")
        if key in seen:
            raise Refused(f"metadata {key!r} appears twice")
        seen.add(key)
        (value_type,) = cursor.take("I", f"metadata {key!r}")
        value = read_value(cursor, value_type, f"metadata {key!r}")
        if isinstance(value, str):
            texts[key] = value
        if key == "general.alignment":
            if value_type != UINT32 or value <= 0 or value & (value - 1):
                raise Refused(f"metadata 'general.alignment' must be a power of two stored as uint32, got {value!r}")
            alignment = value
    return texts, alignment


def read_value(cursor: Cursor, value_type: int, what: str) -> object:
    """One metadata value: a scalar or a string as read; an array checked element by element, as its length."""
    if value_type in SCALAR_FORMATS:
        return cursor.take(SCALAR_FORMATS[value_type], what)[0]
    if value_type == STRING:
        return cursor.text(what)
    if value_type != ARRAY:
        raise Refused(f"{what} has value type {value_type}; the types are 0 to 12")
    element_type, length = cursor.take("IQ", what)
    if element_type in SCALAR_FORMATS:
        cursor.skip(length * struct.calcsize(SCALAR_FORMATS[element_type]), what)
    elif element_type == STRING:
        if length * 8 > cursor.left():
            raise Refused(f"cut short: {what} claims {length} texts, more than the file can hold")
        for index in range(length):
            cursor.text(f"{what} item {index}")
    else:  # transformers' reader refuses arrays of arrays too
        raise Refused(f"{what} is an array of type {element_type}; arrays hold numbers or texts")
    return length


def read_tensor_entry(cursor: Cursor, index: int) -> TensorEntry:
    """One entry of the tensor table, its type known and its shape whole blocks of it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    name = cursor.text(f"the name of tensor {index}")
    what = f"tensor {name!r}"
    (dim_count,) = cursor.take("I", what)
    if not 1 <= dim_count <= MAX_DIMS:
        raise Refused(f"{what} has {dim_count} dimensions; 1 to {MAX_DIMS} are allowed")
    dims = cursor.take(f"{dim_count}Q", what)
    ggml_type, offset = cursor.take("IQ", what)
    if ggml_type not in {t.value for t in GGML_QUANT_SIZES}:
        raise Refused(f"{what} has ggml type {ggml_type}, which is not a known tensor type")
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if min(dims) < 1 or dims[0] % block:
        raise Refused(f"{what} has shape {list(dims)}; each dimension >= 1, the first a multiple of {block}")
    elements = math.prod(dims)
    return TensorEntry(name, elements, ggml_type, offset, elements // block * block_bytes)


def conversion_bytes(header: GGUFHeader) -> int:
    """Memory the conversion worker holds at its peak: torch and transformers, the model once in
    float32 (built on the meta device, each tensor loaded once), the largest tensor while it is
    unpacked. SmolLM2-135M: 1.251 GB estimated, 1.251 GB peak resident measured (docs/runs.md)."""
    largest = max((tensor.elements for tensor in header.tensors), default=0)
    return WORKER_BASELINE_BYTES + 4 * (header.parameters + largest)


def check_conversion_memory(header: GGUFHeader, path: Path, available: int) -> None:
    """Refuse, with the numbers, a conversion that would not fit in `available` bytes of memory."""
    needed = conversion_bytes(header)
    if needed > available:
        raise ModelSourceError(
            f"model.name_or_path: {path}: converting it into safetensors needs about {needed / 1e9:.2f} GB "
            f"({header.parameters:,} parameters in float32) and {available / 1e9:.2f} GB is free; "
            "free some memory, or convert it on a larger machine and name that directory"
        )
