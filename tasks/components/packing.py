"""How a training step's examples become tensors: padded rows, or packed rows.

Padded: each example is one row, right-padded to the longest of the step; causal attention
never lets a real token see the padding after it, so no attention mask is needed.
Packed: the step's examples are laid end to end in as few rows as fit `capacity` tokens
(first fit, longest first). Position ids restart at 0 for every example, which tells the
model where each one begins: transformers attends within each example (FlashAttention's
variable-length kernel, or a block mask), so examples never see each other. The first
token of every example is never a target, exactly as when it starts its own row.
"""

from __future__ import annotations

import torch

from tasks.components.modeling import IGNORE_INDEX, pad_batch


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths` grouped into rows of at most `capacity` tokens (longer ones alone)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        for row, left in enumerate(room):
            if lengths[index] <= left:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def packed_batch(
    sequences: list[list[int]], labels: list[list[int]], capacity: int, pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, position ids and labels of the examples packed into rows.

    Rows are right-padded to the longest row, rounded up to `multiple` (steadier shapes for a
    compiled model); padding continues the last example's positions and is never a target.
    """
    rows = pack_rows([len(seq) for seq in sequences], capacity)
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    width = -(-width // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            length = len(sequences[i])
            ids[r, start : start + length] = torch.tensor(sequences[i])
            positions[r, start : start + length] = torch.arange(length)
            target[r, start : start + length] = torch.tensor(labels[i])
            target[r, start] = IGNORE_INDEX
            start += length
        positions[r, start:] = torch.arange(positions[r, start - 1] + 1, positions[r, start - 1] + 1 + width - start)
    return ids, positions, target


def padded_batch(
    sequences: list[list[int]], labels: list[list[int]], pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels, one example per row, right-padded to the longest (rounded up to `multiple`)."""
    ids, _, target = pad_batch(sequences, labels, pad_id)
    extra = -ids.shape[1] % multiple
    if extra:
        ids = torch.nn.functional.pad(ids, (0, extra), value=pad_id)
        target = torch.nn.functional.pad(target, (0, extra), value=IGNORE_INDEX)
    return ids, target
