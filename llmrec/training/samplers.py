"""Epoch orders for the training loaders: similar-length examples batched together, from (seed, epoch) alone.

A batch is padded to its own longest example, so with histories of mixed lengths (Amazon Beauty: median 6
items, a few hundred) random batches would pad almost every slot to the window; batches of similar lengths
make an epoch cost about what its real positions cost, and the window a cap on context rather than a cost.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class NegativeSampler:
    """Draws item indices with replacement in proportion to `probabilities`, in O(draws x log catalogue).

    `torch.multinomial` rebuilds the cumulative distribution of the whole catalogue at every call, i.e.
    every training step would scan a catalogue-sized table; here it is built once. The cumulative sums
    are accumulated in float32 one after the other and searched with float64 uniforms, as torch's CPU
    kernel does, so the draws equal `torch.multinomial(probabilities, n, replacement=True, generator=g)`
    for the same generator state (tests/test_large_catalogue_training.py): existing runs keep their negatives.
    """

    def __init__(self, probabilities: torch.Tensor) -> None:
        weights = probabilities.detach().cpu().float().numpy()
        if weights.ndim != 1 or not len(weights) or (weights < 0).any() or not weights.sum() > 0:
            raise ValueError("NegativeSampler needs a 1-D tensor of non-negative probabilities with a positive sum.")
        cumulative = np.cumsum(weights, dtype=np.float32)  # sequential float32 sums, as torch's kernel adds
        cumulative /= cumulative[-1]
        cumulative[-1] = 1.0
        self.cumulative = torch.from_numpy(cumulative.astype(np.float64))

    def draw(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        uniforms = torch.rand(num_samples, dtype=torch.float64, generator=generator)
        return torch.searchsorted(self.cumulative, uniforms)


def derived_seed(*keys: int) -> int:
    """A seed for one purpose (stage, epoch, batch, ...) of a run, independent of every other draw."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar-length examples in a new order every epoch that depends only on (seed, epoch).

    With `group_by_length=False` the batches are a random permutation cut into `batch_size` examples (the
    collate still pads each only to its longest).

    The examples are ordered as transformers' `LengthGroupedSampler` orders them (a seeded permutation,
    sorted by length within mega-batches of 50 batches), each mega-batch is cut into batches that hold
    `batch_size` examples' worth of loss terms (`loss_terms`, one per example by default), and the
    batches are shuffled. Stage 1's loss is a mean over real positions, so its batches hold a fixed number of
    positions (many short windows or a few long ones): every position keeps the weight it had in a random
    batch of `batch_size` windows, and an epoch keeps its number of steps. Stage 2 has one loss term per
    example, so its batches hold exactly `batch_size` examples.

    A resumed run replays the interrupted epoch's batches, and every process draws the same ones for
    Accelerate to shard. The loop sets `epoch`; there is deliberately no `set_epoch`, which Accelerate would
    call with its own per-loader count (it restarts at 0 for a skipping loader).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, loss_terms: Optional[Sequence[int]] = None,
        group_by_length: bool = True,
    ) -> None:
        self.lengths = [int(length) for length in lengths]
        self.loss_terms = [1] * len(self.lengths) if loss_terms is None else [int(terms) for terms in loss_terms]
        if len(self.loss_terms) != len(self.lengths):
            raise ValueError(f"{len(self.loss_terms)} loss_terms for {len(self.lengths)} lengths; give one per example.")
        self.batch_size = batch_size
        # A batch's share of loss terms: what `batch_size` examples hold on average.
        self.terms_per_batch = batch_size * sum(self.loss_terms) / max(1, len(self.lengths))
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 1
        self._batches: tuple[int, list[list[int]]] = (0, [])

    def batches(self) -> list[list[int]]:
        """This epoch's batches of example indices (computed once per epoch)."""
        epoch, batches = self._batches
        if epoch != self.epoch:
            batches = self._draw(torch.Generator().manual_seed(derived_seed(self.seed, self.epoch)))
            self._batches = (self.epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def _draw(self, generator: torch.Generator) -> list[list[int]]:
        if not self.lengths:
            return []
        if not self.group_by_length:
            # A random permutation cut into batches of `batch_size`: the order earlier llmrec versions drew.
            order = torch.randperm(len(self.lengths), generator=generator).tolist()
            return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        # 50 batches per mega-batch as in transformers, or 2 mega-batches in a small data set (transformers
        # makes 4, which on MovieLens-100k leaves lengths too mixed within each to fill the batches).
        mega_batch_size = self.batch_size * max(1, min(len(self.lengths) // (2 * self.batch_size), 50))
        order = get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_size // self.batch_size, generator)
        batches = []
        for start in range(0, len(order), mega_batch_size):
            batches += self._cut(order[start : start + mega_batch_size])
        # Mega-batches are sorted longest first; shuffled, the steps do not sweep from long to short windows.
        return [batches[position] for position in torch.randperm(len(batches), generator=generator).tolist()]

    def _cut(self, mega_batch: list[int]) -> list[list[int]]:
        """Consecutive runs of a length-sorted mega-batch, each closed once it holds `terms_per_batch` loss terms.

        A batch is also closed before its padded loss terms (its most terms x its examples) would pass 1.25
        times that share, which only happens where lengths change fast.
        """
        padded_limit = 1.25 * self.terms_per_batch
        batches, current, terms, most = [], [], 0, 0
        for index in mega_batch:
            added = self.loss_terms[index]
            if current and (len(current) + 1) * max(most, added) > padded_limit:
                batches.append(current)
                current, terms, most = [], 0, 0
            current.append(index)
            terms, most = terms + added, max(most, added)
            if terms >= self.terms_per_batch:
                batches.append(current)
                current, terms, most = [], 0, 0
        if not current:
            return batches
        previous = batches[-1] if batches else []
        merged_most = max([most] + [self.loss_terms[index] for index in previous])
        if previous and terms < self.terms_per_batch / 2 and (len(previous) + len(current)) * merged_most <= padded_limit:
            previous += current  # the mega-batch's short tail joins the batch before it rather than being a step alone
        else:
            batches.append(current)
        return batches
