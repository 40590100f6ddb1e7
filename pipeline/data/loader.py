"""WebDataset streaming loader with exact mid-epoch resume and equal batch counts on all ranks.

Per epoch the shard list is shuffled with (seed, epoch), dealt to ranks (`rank::world_size`) and then
to DataLoader workers. Each worker reads its shards through a webdataset pipeline, shuffles raw
samples with an RNG seeded by (seed, epoch, rank, worker) and cuts the raw stream into fixed windows
of `batch_size` samples; batch j of a worker is the decodable samples of its window j, topped up from
the following windows when some were bad (so those samples also appear in the next batch). Because
windows are fixed in the raw stream, resuming skips
raw tar members without decoding them. Worker w makes exactly floor(samples_w / batch_size) batches
(its stream wraps around if a truncated shard came up short), so the DataLoader's round-robin over
workers can be replayed from the manifest counts: a resumed loader knows how many batches each worker
already delivered and rotates worker ids so the right one goes first. Every rank stops after
`batches_per_epoch` = the smallest rank's batch count.
"""
from __future__ import annotations

import collections
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import timm
import timm.data
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.decode import (BadSample, DecodeSpec, SkipCounter, collate, decode_train_sample, tar_samples,
                                  stable_id)
from pipeline.config import check_loader_values
from pipeline.errors import JobFault, UserError, first_line
from pipeline.data.shards import Shard, resolve_shards


IMAGE_MODES = ("patch", "roi", "features")
_BROKEN_PIPE = (EOFError, ConnectionError)   # how the main process meets a worker that died mid-handover


def image_norm_for(model_name: str) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, interpolation) of a timm model's pretrained_cfg; nothing is downloaded."""
    cfg = timm.get_pretrained_cfg(model_name)
    if cfg is None:
        raise UserError(f"image backbone {model_name!r} is not a timm model with a pretrained_cfg; "
                        "pick a name from timm.list_models()")
    data_cfg = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    return tuple(data_cfg["mean"]), tuple(data_cfg["std"]), str(data_cfg.get("interpolation", "bicubic"))


@dataclass
class LoaderConfig:
    shards: str
    batch_size: int = 32
    image_size: int = 96
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    max_text_len: int = 40
    num_workers: int = 2
    seed: int = 0
    shuffle_buffer: int = 1000
    shuffle: bool = True
    resampled: bool = False
    image_mode: str = "patch"
    max_regions: int = 36
    feat_dim: int | None = None
    prefetch_factor: int = 2
    swap_captions: bool = False   # batches also carry a relation/attribute-swapped caption per sample

    def __post_init__(self) -> None:
        check_loader_values(self, "loader.")   # the data section's rules (image size, text length, ...)
        checks = [("batch_size", self.batch_size >= 1), ("image_mode", self.image_mode in IMAGE_MODES),
                  ("mean/std", len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0)]
        for name, ok in checks:
            if not ok:
                raise UserError(f"loader config: invalid {name}={getattr(self, name.split('/')[0])!r}")
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))

    @classmethod
    def for_model(cls, model_name: str, **kw) -> "LoaderConfig":
        mean, std, interpolation = image_norm_for(model_name)
        return cls(mean=mean, std=std, interpolation=interpolation, **kw)

    def decode_spec(self) -> DecodeSpec:
        return DecodeSpec(self.image_size, self.mean, self.std, self.max_text_len, self.image_mode,
                          self.max_regions, self.interpolation, self.feat_dim, self.swap_captions)


def _seed(*parts: Any) -> int:
    return stable_id("/".join(map(str, parts)))


@dataclass
class EpochPlan:
    """Who reads what in one epoch on one rank, and where each worker resumes."""
    worker_shards: list[list[Shard]]       # by logical worker
    worker_batches: list[int | None]       # None: infinite (resampled)
    batches_per_epoch: int
    skip: list[int] = field(default_factory=list)   # batches already delivered, per logical worker
    first_worker: int = 0                   # logical worker that delivers the next batch


def _round_robin_replay(counts: list[int], consumed: int) -> tuple[list[int], int]:
    """Replay the DataLoader's round-robin (exhausted workers drop out) for `consumed` batches."""
    n = len(counts)
    delivered, w = [0] * n, 0
    for _ in range(consumed):
        while delivered[w] >= counts[w]:
            w = (w + 1) % n
        delivered[w] += 1
        w = (w + 1) % n
    if any(d < c for d, c in zip(delivered, counts)):
        while delivered[w] >= counts[w]:
            w = (w + 1) % n
    return delivered, w


def plan_epoch(shards: list[Shard], cfg: LoaderConfig, rank: int, world_size: int, epoch: int,
               start_batch: int) -> EpochPlan:
    n_workers = max(1, cfg.num_workers)
    if cfg.resampled:
        bpe = sum(s.samples for s in shards) // (world_size * cfg.batch_size)
        if bpe == 0:
            raise UserError(f"shards {cfg.shards}: fewer samples than world_size*batch_size")
        skip = [start_batch // n_workers + int(w < start_batch % n_workers) for w in range(n_workers)]
        return EpochPlan([shards] * n_workers, [None] * n_workers, bpe, skip, start_batch % n_workers)
    order = list(shards)
    if cfg.shuffle:
        random.Random(_seed("shards", cfg.seed, epoch)).shuffle(order)
    per_rank = []
    for r in range(world_size):
        mine = order[r::world_size]
        per_rank.append([mine[w::n_workers] for w in range(n_workers)])
    counts = [[sum(s.samples for s in ws) // cfg.batch_size for ws in rank_ws] for rank_ws in per_rank]
    bpe = min(sum(c) for c in counts)
    if bpe == 0:
        raise UserError(f"shards {cfg.shards}: {len(shards)} shard(s) give some rank of {world_size} no full "
                        f"batch of {cfg.batch_size}; write more/smaller shards or lower batch_size")
    if not 0 <= start_batch <= bpe:
        raise UserError(f"loader resume: start_batch={start_batch} outside 0..{bpe} for epoch {epoch}")
    skip, first = _round_robin_replay(counts[rank], start_batch)
    return EpochPlan(per_rank[rank], counts[rank], bpe, skip, first)


class _RankStream(IterableDataset):
    """One rank's epoch; each DataLoader worker runs one logical worker's stream."""

    def __init__(self, plan: EpochPlan, cfg: LoaderConfig, tokenizer, rank: int, epoch: int):
        super().__init__()
        self.plan, self.cfg, self.tokenizer, self.rank, self.epoch = plan, cfg, tokenizer, rank, epoch

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        info = get_worker_info()
        n = len(self.plan.worker_shards)
        if info is None:
            # In-process: interleave the logical workers exactly like the DataLoader would.
            return _interleave([self._worker(w) for w in range(n)], self.plan.first_worker)
        torch.set_num_threads(1)
        return self._worker((info.id + self.plan.first_worker) % n)

    def _raw_pass(self, worker: int, pass_no: int, counter: SkipCounter) -> Iterator[dict]:
        cfg, shards = self.cfg, self.plan.worker_shards[worker]
        tag = (cfg.seed, self.epoch, self.rank, worker, pass_no)
        if cfg.resampled:
            rng = random.Random(_seed("resample", *tag))
            urls = [rng.choice(shards).url for _ in range(len(shards))]
        else:
            urls = [s.url for s in shards]
            if pass_no > 0:
                random.Random(_seed("wrap", *tag)).shuffle(urls)
        if not urls:
            return iter(())
        stages = [wds.SimpleShardList(urls), *tar_samples(counter)]
        if cfg.shuffle:
            # The RNG is created here, inside the worker: one handed in would be copied to every worker.
            initial = min(cfg.shuffle_buffer, 100)
            stages.append(wds.shuffle(cfg.shuffle_buffer, initial, rng=random.Random(_seed("samples", *tag))))
        return iter(wds.DataPipeline(*stages))

    def _raw_stream(self, worker: int, counter: SkipCounter) -> Iterator[dict]:
        for pass_no in itertools.count():
            empty = True
            for sample in self._raw_pass(worker, pass_no, counter):
                empty = False
                yield sample
            if empty:
                return

    def _decode_window(self, raw: list[dict], counter: SkipCounter) -> list[dict]:
        spec, good = self.cfg.decode_spec(), []
        for sample in raw:
            try:
                good.append(decode_train_sample(sample, self.tokenizer, spec, self.cfg.seed, self.epoch))
            except BadSample as bad:
                counter.add(bad.reason)
        if spec.image_mode == "features" and good:
            dim = good[0]["region_feat"].shape[1]
            counter.add("bad_npz", sum(g["region_feat"].shape[1] != dim for g in good))
            good = [g for g in good if g["region_feat"].shape[1] == dim]
        return good

    def _worker(self, worker: int) -> Iterator[tuple[dict, dict]]:
        total, skip, bs = self.plan.worker_batches[worker], self.plan.skip[worker], self.cfg.batch_size
        if total is not None and skip >= total:
            return
        counter = SkipCounter()
        raw = self._raw_stream(worker, counter)
        for _ in itertools.islice(raw, skip * bs):   # raw members only: nothing decoded
            pass
        # Decoded windows, ahead[0] = this batch's window; later ones are read ahead only to top up a
        # window that lost samples (they are used again for their own batches).
        ahead: collections.deque[list[dict]] = collections.deque()
        limit = 2 + 4 * sum(s.samples for s in self.plan.worker_shards[worker]) // bs
        for _ in range(skip, total if total is not None else 2**62):
            batch: list[dict] = []
            for i in itertools.count():
                if i == len(ahead):
                    window = list(itertools.islice(raw, bs))
                    if not window or i > limit:
                        break
                    ahead.append(self._decode_window(window, counter))
                taken = {s["image_id"] for s in batch}
                batch.extend(s for s in ahead[i] if s["image_id"] not in taken)
                if len(batch) >= bs:
                    break
            if not batch:
                raise UserError(f"shards {self.cfg.shards}: no decodable samples left in the stream of "
                                f"rank {self.rank} worker {worker} (skipped: {dict(counter.counts)}); fix or "
                                f"rewrite the shards")
            ahead.popleft()
            yield collate(batch[:bs], self.cfg.decode_spec()), counter.take()


def _interleave(streams: list[Iterator], first: int) -> Iterator:
    """Round-robin from `first`, exhausted streams dropping out (what the DataLoader does with workers)."""
    order = collections.deque((first + i) % len(streams) for i in range(len(streams)))
    while order:
        w = order.popleft()
        try:
            item = next(streams[w])
        except StopIteration:
            continue
        order.append(w)
        yield item


class StreamingLoader:
    """Iterable of batch dicts for one rank; one pass is one epoch, after which the epoch advances."""

    def __init__(self, cfg: LoaderConfig, tokenizer, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 start_batch: int = 0):
        if not 0 <= rank < world_size:
            raise UserError(f"loader: rank={rank} outside 0..{world_size - 1}")
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, rank, world_size
        self.shards = resolve_shards(cfg.shards)
        self.epoch, self._consumed = epoch, start_batch
        self.skipped: dict[str, int] = {}
        self._plan = plan_epoch(self.shards, cfg, rank, world_size, epoch, start_batch)

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields in the current epoch (the same on all ranks)."""
        return self._plan.batches_per_epoch

    def batches_in_epoch(self, epoch: int) -> int:
        return plan_epoch(self.shards, self.cfg, self.rank, self.world_size, epoch, 0).batches_per_epoch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._consumed}

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._consumed = epoch, 0
        self._plan = plan_epoch(self.shards, self.cfg, self.rank, self.world_size, epoch, 0)

    def __len__(self) -> int:
        return self.batches_per_epoch - self._consumed

    def _source(self) -> Iterator[tuple[dict, dict]]:
        stream = _RankStream(self._plan, self.cfg, self.tokenizer, self.rank, self.epoch)
        if self.cfg.num_workers == 0:
            return iter(stream)
        loader = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                            prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False)
        return iter(loader)

    def _worker_fault(self, reason: str) -> JobFault:
        return JobFault(f"rank {self.rank}: a data-loader worker of shards {self.cfg.shards} died ({reason}); "
                        f"the run stops. If it was killed for memory, lower data.num_workers or "
                        f"data.shuffle_buffer, then resume")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Re-planned from the current position: a loop that broke off mid-epoch continues exactly.
        self._plan = plan_epoch(self.shards, self.cfg, self.rank, self.world_size, self.epoch, self._consumed)
        remaining = self.batches_per_epoch - self._consumed
        source = self._source()
        try:
            for _ in range(remaining):
                death = None
                try:
                    batch, skipped = next(source)
                except UserError as exc:
                    raise UserError(_own_message(exc)) from None
                except (RuntimeError, *_BROKEN_PIPE) as exc:
                    death = exc   # no call here: torch's SIGCHLD handler could land in it (see below)
                except StopIteration:
                    raise UserError(f"shards {self.cfg.shards}: the stream of rank {self.rank} ended before "
                                    f"{self.batches_per_epoch} batches (unreadable shards? skipped: "
                                    f"{self.skipped}); fix or rewrite the shards") from None
                if death is not None:
                    if self.cfg.num_workers == 0:
                        raise death
                    try:
                        _await_death_report(death)
                    except RuntimeError as report:
                        death = report
                    if not _worker_died(death):
                        raise death
                    # Dropped before the fault, which has no cause: a traceback through the DataLoader keeps its
                    # workers registered with torch's SIGCHLD handler, which would raise the death again over it.
                    reason, death, source = first_line(death), None, None
                    raise self._worker_fault(reason)
                for reason, n in skipped.items():
                    self.skipped[reason] = self.skipped.get(reason, 0) + n
                self._consumed += 1
                yield batch
        finally:
            source = None   # shuts the DataLoader workers down
        if self._consumed >= self.batches_per_epoch:
            self.set_epoch(self.epoch + 1)


def _await_death_report(death: BaseException) -> None:
    """torch's SIGCHLD handler raises a worker's death once, in whatever the main thread runs when the signal
    lands. A broken pipe means the worker is still dying: wait here, briefly, for that report."""
    if isinstance(death, _BROKEN_PIPE):
        for _ in range(40):
            time.sleep(0.05)


def _worker_died(exc: BaseException) -> bool:
    """torch reports a dead worker as a RuntimeError naming it; when the worker dies while handing over a batch
    (shared-memory file descriptors), the main process gets the broken connection instead."""
    return isinstance(exc, _BROKEN_PIPE) or "DataLoader worker" in str(exc)


def _own_message(exc: UserError) -> str:
    """A UserError raised in a DataLoader worker arrives with torch's worker traceback prepended to its message;
    the user's one line is its last part."""
    text = str(exc)
    return text.rsplit("UserError: ", 1)[-1].strip() if text.startswith("Caught UserError") else text


# ----------------------------------------------------------------------------- the endless training stream

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
