"""Endless batch stream over epochs with an exact, resumable position (epoch, batches consumed)."""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from pipeline.loader import LoaderConfig, StreamingLoader


class BatchStream:
    """``next()`` returns the next training batch; epochs roll over; ``state()`` resumes exactly."""

    def __init__(self, cfg: LoaderConfig, tokenizer, rank: int, world_size: int,
                 state: Optional[dict] = None, device: torch.device = torch.device("cpu")):
        self.cfg, self.tokenizer, self.rank, self.world_size, self.device = cfg, tokenizer, rank, world_size, device
        state = state or {"epoch": 0, "batches": 0}
        self.loader = StreamingLoader(cfg, tokenizer, rank, world_size, epoch=state["epoch"],
                                      start_batch=state["batches"])
        self._it: Optional[Iterator] = None

    def state(self) -> dict:
        return self.loader.state()

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped by reason on this rank since the start of this process."""
        return dict(self.loader.skipped)

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                self._it = _iter_keeping_rng(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None   # the loader advanced its epoch; start the next pass
        raise RuntimeError(f"shards {self.cfg.shards}: an epoch yielded no batch; use more data or a smaller batch")

    def __iter__(self):
        return self

    def history(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The last ``n`` batches before the current position (fewer at the very start), oldest first.

        Rebuilds loaders at earlier positions, so it is exact wherever the loader's resume is exact.
        """
        epoch, pos = self.state()["epoch"], self.state()["batches"]
        spans = []   # (epoch, start, count), newest first
        while n > 0 and epoch >= 0:
            take = min(n, pos)
            if take:
                spans.append((epoch, pos - take, take))
                n -= take
            epoch -= 1
            if epoch >= 0:
                pos = self.loader.batches_in_epoch(epoch)
        out: list[dict] = []
        for ep, start, count in reversed(spans):
            loader = StreamingLoader(self.cfg, self.tokenizer, self.rank, self.world_size, epoch=ep,
                                     start_batch=start)
            it = _iter_keeping_rng(loader)
            out.extend(next(it) for _ in range(count))
            del it
        return out


def _iter_keeping_rng(loader: StreamingLoader) -> Iterator:
    """iter(loader) without touching the global torch RNG (a DataLoader draws its base seed from it), so
    model randomness (dropout) does not depend on when loaders were (re)built, e.g. after a resume."""
    state = torch.get_rng_state()
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        torch.set_rng_state(state)
        return iter(())
    torch.set_rng_state(state)

    def chain():
        yield first
        yield from it
    return chain()
