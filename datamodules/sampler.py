"""The training order as a function of (seed, epoch), resumed at the batch a checkpoint stopped at.

A DataLoader with ``shuffle=True`` draws each epoch's order from torch's global generator and,
after a restart from a mid-epoch checkpoint, starts the epoch over with a new order: the
resumed run sees other batches than the uninterrupted one. Lightning restores the loop
counters but leaves the order to the loader, and torch's samplers have no notion of "where a
run stood". :class:`ResumableSampler` fills that gap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

__all__ = ["ResumableLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """Shuffled training indices whose order depends only on (seed, epoch) and which start at the
    batch training has reached.

    Epoch ``e``'s order is ``randperm(len(dataset))`` seeded by ``seed + e``; global batch ``j``
    is positions ``[j * B * R, (j + 1) * B * R)`` of it (``B`` the per-rank batch size, ``R`` the
    ranks), of which rank ``r`` takes the ``r``-th run of ``B``; the last incomplete batch is
    dropped. Each time an iteration starts it asks ``batches_done()`` how many batches per
    rank training has consumed in all (:meth:`batches_after`) and yields one pass's worth from
    that batch of that epoch on (into the next epoch's order where it started inside one), so a
    run resumed from any checkpoint draws exactly the batches the uninterrupted run would. A subclass of ``DistributedSampler`` so Lightning leaves it in
    place under DDP instead of wrapping it.

    Args:
        dataset: a sized dataset.
        batch_size: images per batch and per rank.
        batches_done: returns the batches per rank consumed so far (default: always 0).
        seed: seed of the orders.
        num_replicas, rank: the ranks (default: one process).
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        batches_done: Callable[[], int] | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"ResumableSampler batch_size must be a positive int, got {batch_size!r}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler rank must lie in [0, {num_replicas}), got {rank!r}.")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.batches_done = batches_done if batches_done is not None else (lambda: 0)
        self.num_examples = len(dataset)
        self.batches_per_epoch = self.num_examples // (batch_size * num_replicas)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"ResumableSampler: {self.num_examples} examples make no full batch of {batch_size} x {num_replicas} ranks."
            )

    def __len__(self) -> int:
        """Indices per rank in a full epoch."""
        return self.batches_per_epoch * self.batch_size

    def batches_after(self, optimizer_steps: int, accumulate: int = 1, epoch_limit: int | None = None) -> int:
        """Batches per rank consumed after ``optimizer_steps`` optimizer steps of ``accumulate``
        batches each.

        Lightning ends an epoch after ``epoch_limit`` batches (``limit_train_batches``; None: a
        whole pass), and the epoch's last, shorter window steps too: 4 batches an epoch at
        ``accumulate`` 3 are 2 steps, of 3 and 1 batches. An epoch cut short by the limit is that
        many batches wherever it starts (:meth:`__iter__` goes on into the next pass), so each
        epoch is ``epoch_limit`` batches in the same number of steps.
        """
        window = max(1, accumulate)
        per_epoch = self.batches_per_epoch if epoch_limit is None else max(1, min(int(epoch_limit), self.batches_per_epoch))
        steps_per_epoch = -(-per_epoch // window)
        epochs, steps = divmod(int(optimizer_steps), steps_per_epoch)
        return epochs * per_epoch + steps * window

    def order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s permutation of the dataset's indices (the same on every rank)."""
        return torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[int]:
        """One pass's worth of batches (``len(self)`` indices), from the batch training has
        reached on, into the next pass where it started inside one.

        Lightning takes what its epoch holds: the loader's length counted from where a resumed
        epoch stands, or ``limit_train_batches``, so an epoch the limit cuts is that many batches
        even where a pass ends inside it. Had the iterator stopped at the pass's end, that epoch
        would have ended without stepping its last, shorter accumulation window, and the count of
        batches consumed (:meth:`batches_after`) would have started the next epoch on those
        batches again, and again.
        """
        done = int(self.batches_done())
        width = self.batch_size * self.num_replicas
        order_epoch = done // self.batches_per_epoch
        order = self.order(order_epoch)
        for position in range(done, done + self.batches_per_epoch):
            epoch, batch = divmod(position, self.batches_per_epoch)
            if epoch != order_epoch:  # into the next pass
                order, order_epoch = self.order(epoch), epoch
            start = batch * width + self.rank * self.batch_size
            yield from order[start : start + self.batch_size].tolist()


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler`, marked resumable for Lightning.

    Lightning calls a loader with ``state_dict`` / ``load_state_dict`` resumable and, for one
    without, warns on a mid-epoch resume that "your dataloader is not resumable". Here the
    sampler already starts at the batch the checkpoint stopped at, so the only state is the
    order's seed (which the DataModule's own state restores too); a checkpoint of another
    order is refused rather than silently mixed.
    """

    #: a ResumableSampler, unless Lightning rebuilt the loader with one of its own (overfit_batches)
    sampler: ResumableSampler | Sampler

    def state_dict(self) -> dict[str, Any]:
        # Lightning may rebuild the loader with a sampler of its own (overfit_batches: a
        # sequential one), which has no order to keep.
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        return {"shuffle_seed": self.sampler.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(self.sampler, ResumableSampler):
            return
        saved = state_dict.get("shuffle_seed", self.sampler.seed)
        if saved != self.sampler.seed:
            raise ValueError(
                f"The checkpoint's training order was drawn with seed {saved}; this loader's with seed "
                f"{self.sampler.seed}. Restore the DataModule's state (trainer.fit(..., ckpt_path=...) does)."
            )
