"""The epoch's sample order and its batch arithmetic, independent of the world size.

One home for what every family's data shares (MosaicML Streaming's "elastic determinism"):

* **Samples are numbered per epoch.** Epoch ``e`` of a train split is a sequence of
  ``samples`` items (text windows, audio or image crops, SFT rows, multimodal sequences) in an
  order that is a pure function of ``(seed, e)``: never of how many ranks read it.
* **Global batches.** Optimizer step ``s`` of an epoch trains on served positions
  ``[s * G, (s + 1) * G)`` with ``G = train.global_batch_size``. ``world`` ranks with micro-batch
  ``B`` take it as ``A = G / (B * world)`` accumulation steps; in each, rank ``r`` takes positions
  ``[(k * world + r) * B, ... + B)`` (``k``: the micro-batch of the epoch), so every global batch
  holds the same samples at any world size, and only the float reduction order differs.
* **The cursor.** A checkpoint records the samples of the epoch consumed (a multiple of ``G``);
  any world size resumes from it (the streams start at the shuffle block that holds it).
* **Shuffle blocks.** Shuffling permutes the served positions inside aligned blocks of
  ``data.shuffle_block`` samples (default 2**16; MosaicML Streaming's shuffle block is 2**18
  samples; a block of 1,024-token windows holds about 270 MB of int32 tokens) (plus a per-epoch permutation of the shards' row groups), so a
  resume re-reads at most one block and memory is bounded by one block; a block as large as the
  epoch is a full permutation (sampling without replacement, at least as good as nanoGPT's
  i.i.d. windows: ``benchmarks/vs_reference_loop.py`` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megaray.errors import ConfigError


def block_size(shuffle_block: int, global_batch: int) -> int:
    """Samples per shuffle block: ``shuffle_block`` rounded up to whole global batches (0: no
    shuffling; positions are served in stream order, one global batch at a time)."""
    if shuffle_block <= 0:
        return 0
    return -(-shuffle_block // global_batch) * global_batch


@dataclass(frozen=True)
class BatchPlan:
    """How one split's epoch is served: ``samples`` per epoch, ``global_batch`` per optimizer step,
    ``micro_batch`` rows per rank per forward.

    Every epoch serves :attr:`served` samples (whole global batches; the tail is dropped), so an
    epoch always ends at an optimizer step and every rank reads the same number of rows.
    """

    samples: int
    global_batch: int
    micro_batch: int

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        return self.samples // self.global_batch

    @property
    def served(self) -> int:
        """Samples served per epoch: ``steps_per_epoch * global_batch``."""
        return self.steps_per_epoch * self.global_batch

    def accum(self, world: int) -> int:
        """Gradient-accumulation steps at ``world`` ranks: ``global_batch / (micro_batch * world)``.

        Raises:
            ConfigError: ``world`` does not divide the global batch (names the sizes that do).
        """
        per = self.micro_batch * world
        if world < 1 or self.global_batch % per:
            raise ConfigError(
                f"train.global_batch_size {self.global_batch} is not a multiple of data.batch_size {self.micro_batch} "
                f"x {world} workers; world sizes that divide it: {self.worlds(1, max(world, 8)) or 'none'} "
                "(or set train.global_batch_size to a multiple of batch_size x each size the run may have)"
            )
        return self.global_batch // per

    def worlds(self, lo: int, hi: int) -> List[int]:
        """World sizes in ``[lo, hi]`` that divide the global batch."""
        return [w for w in range(max(1, lo), hi + 1) if self.global_batch % (self.micro_batch * w) == 0]

    def micro_batches(self, world: int) -> int:
        """Micro-batches each of ``world`` ranks trains on per epoch."""
        return self.served // (self.micro_batch * world)

    def position(self, samples_in_epoch: int, world: int) -> int:
        """The micro-batch of the epoch (per rank) that a cursor of ``samples_in_epoch`` stands at."""
        return samples_in_epoch // (self.micro_batch * world)


def global_batch_size(explicit: Optional[int], batch_size: int, grad_accum_steps: int, max_workers: int) -> int:
    """``train.global_batch_size``, or its default ``batch_size * grad_accum_steps * max_workers``
    (the batch of a fixed-size run; an elastic run's largest size)."""
    return int(explicit) if explicit else batch_size * grad_accum_steps * max_workers


def train_plan(
    samples: int,
    global_batch: int,
    batch_size: int,
    where: str,
    unit: str = "samples",
    hint: str = "prepare more data or lower data.batch_size",
) -> BatchPlan:
    """The train split's :class:`BatchPlan`, checked to hold at least one global batch.

    Raises:
        ConfigError: fewer than ``global_batch`` samples (names ``where``, the counts and ``hint``).
    """
    plan = BatchPlan(int(samples), int(global_batch), int(batch_size))
    if plan.steps_per_epoch < 1:
        raise ConfigError(
            f"data: the train split of {where} holds {samples} {unit}, fewer than one global batch of "
            f"{global_batch} (train.global_batch_size, or batch_size x grad_accum_steps x workers); {hint}"
        )
    return plan


def val_batches(samples: int, world: int, batch_size: int, limit: int) -> int:
    """Validation batches per rank per evaluation: ``min(limit, samples // (world * batch_size))``."""
    return min(limit, max(0, int(samples)) // (world * batch_size))


def check_val(
    samples: int,
    world: int,
    batch_size: int,
    where: str,
    unit: str = "samples",
    hint: str = "prepare with a larger val fraction or lower data.batch_size",
) -> None:
    """Raises ConfigError when the val split cannot give each of ``world`` ranks one batch."""
    if val_batches(samples, world, batch_size, 1) < 1:
        raise ConfigError(
            f"data: the val split of {where} holds {samples} {unit}, fewer than {world} workers x "
            f"batch_size {batch_size}; {hint}"
        )
