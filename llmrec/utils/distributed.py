"""Sharding batched inference across processes and gathering the rows back in order.

Catalogue encoding and evaluation split their *batches*, not their rows: every batch is the batch one
process would have run, with the same rows and the same padding width, so the gathered result is the
one-process result to the bit (on the same hardware and thread count), and the work stays balanced.
"""

from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import torch

Batch = TypeVar("Batch")


def is_distributed(accelerator: Optional[object]) -> bool:
    """True when `accelerator` runs more than one process (None: one process)."""
    return accelerator is not None and getattr(accelerator, "num_processes", 1) > 1


def shard_batches(accelerator: Optional[object], batches: Sequence[Batch]) -> list[Batch]:
    """This process's share of `batches`: every `num_processes`-th batch, starting at its rank.

    Batches come sorted longest first, so a contiguous split would give process 0 all the long ones;
    the round-robin order is laid out so that `split_between_processes` (which gives the first
    `len % num_processes` processes one extra) hands each process exactly its round-robin share.
    """
    if not is_distributed(accelerator):
        return list(batches)
    count = accelerator.num_processes
    round_robin = [batch for rank in range(count) for batch in batches[rank::count]]
    with accelerator.split_between_processes(round_robin) as mine:
        return list(mine)


def gather_rows(accelerator: Optional[object], rows: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write every process's `values` at its `rows` of `out` (the full table), on every process.

    Shards differ in length when the batches do not divide evenly; they are padded to the longest with
    row -1, and those padding rows are dropped before writing, so no padding reaches `out` and no row
    is written twice. Memory: this process's shard plus one gathered table (`num_processes` x the
    longest shard, about the size of `out`).
    """
    rows = rows.to(device=values.device, dtype=torch.long)
    if not is_distributed(accelerator):
        out[rows.to(out.device)] = values.to(out.dtype).to(out.device)
        return out
    # NCCL gathers only device tensors; gloo gathers CPU ones (accelerator.device is then the CPU).
    rows, values = rows.to(accelerator.device).contiguous(), values.to(accelerator.device).contiguous()
    all_rows = accelerator.gather(accelerator.pad_across_processes(rows, dim=0, pad_index=-1))
    all_values = accelerator.gather(accelerator.pad_across_processes(values, dim=0, pad_index=0))
    real = all_rows >= 0
    written = all_rows[real]
    if written.numel() != torch.unique(written).numel():
        raise RuntimeError("Two processes returned the same row; the shards overlap (a bug in shard_batches).")
    out[written.to(out.device)] = all_values[real].to(out.dtype).to(out.device)
    return out
