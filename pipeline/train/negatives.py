"""Hard negatives from a candidate pool fed by the stream (shards have no random access).

The pool holds the last ``capacity`` batches the training loop consumed (the current one included). Its
content is a pure function of the loader position, so a resumed run refills it by replaying those batches
(see ``pipeline.data.loader.BatchStream.history``) and mines exactly the negatives an uninterrupted run would.
It is a preallocated ring buffer: its memory is fixed at the first ``add`` and bounded by :func:`pool_bytes`.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from models.image_encoder import ImageTokens
from pipeline.errors import UserError


IMAGE_KEYS = ("pixels", "boxes", "region_feat", "region_pos", "region_mask")
TEXT_KEYS = ("input_ids", "text_mask", "word_index", "word_to_region")
REGION_KEYS = ("boxes", "region_feat", "region_pos", "region_mask")   # dim 1 is the region count
POOL_KEYS = IMAGE_KEYS + TEXT_KEYS + ("image_id",)                     # what lookups read (text_id is not kept)
TEXT_ROW_BYTES = 8 + 1 + 8 + 8   # per token: input_ids, text_mask, word_index, word_to_region
POS_DIM = 7                      # x1, y1, x2, y2, w, h, w*h


def pad_cat(tensors: list[torch.Tensor], value=0) -> torch.Tensor:
    """Concatenate along dim 0, padding dim 1 (sequence / region count) to the longest."""
    if tensors[0].dim() < 2:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        if t.shape[1] < width:
            pad = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), value)
            t = torch.cat([t, pad], dim=1)
        out.append(t)
    return torch.cat(out)


def pad_value(key: str):
    """The padding of a padded key: -1 for word indices / word->region (no word), else 0."""
    return -1 if key in ("word_index", "word_to_region") else 0


def _max_width(key: str, widths: "PoolWidths") -> Optional[int]:
    """The widest dim 1 a batch can bring for ``key``; None where it is not padded or not known."""
    if key in TEXT_KEYS:
        return widths.text
    if key in REGION_KEYS:
        return widths.regions
    return None


def _padded(key: str) -> bool:
    return key in TEXT_KEYS or key in REGION_KEYS


@dataclass(frozen=True)
class PoolWidths:
    """The widest text (tokens, ``data.max_text_len``) and region count (``data.max_regions``) a batch can
    bring. Known widths are allocated up front, so the pool never reallocates; an unknown one (None) starts
    at the first batch's width and grows when a wider batch arrives."""
    text: Optional[int] = None
    regions: Optional[int] = None


class CandidatePool:
    """The last ``capacity_batches`` batches as a ring buffer: one preallocated tensor per key, written in place
    by :meth:`add`, read by index gathers of only the requested rows.

    Rows are numbered as if the held batches were concatenated oldest first (row 0 = the oldest sample, the
    newest batch last, so ``len(pool) - b`` is where the current batch starts). A lookup pads dim 1 of each
    key to the widest width among the batches held, exactly as concatenating them would.
    """

    def __init__(self, capacity_batches: int, widths: PoolWidths = PoolWidths()):
        # ring slots of the held batches, oldest first; maxlen is the capacity in batches
        self.batches: deque[int] = deque(maxlen=max(1, capacity_batches))
        self.widths = widths
        self.batch_size = 0
        self._store: dict[str, torch.Tensor] = {}
        self._slot_widths: dict[str, list[int]] = {}   # padded key -> dim 1 of the batch in each slot

    @classmethod
    def for_config(cls, cfg, micro_batch_size: int) -> "CandidatePool":
        """The fine-tuning pool: ``finetune.pool_size`` samples rounded up to whole batches, widths allocated at
        ``data.max_text_len`` / ``data.max_regions``."""
        return cls(pool_batches(cfg.finetune.pool_size, micro_batch_size),
                   PoolWidths(text=cfg.data.max_text_len, regions=cfg.data.max_regions))

    @property
    def capacity_batches(self) -> int:
        return self.batches.maxlen

    @property
    def capacity_rows(self) -> int:
        return self.capacity_batches * self.batch_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def __len__(self) -> int:
        return len(self.batches) * self.batch_size

    # ---- writing ---------------------------------------------------------------------------------
    def add(self, batch: dict) -> None:
        tensors = {k: v.detach() for k, v in batch.items() if k in POOL_KEYS and torch.is_tensor(v)}
        if not self._store:
            self._allocate(tensors)
        self._check_fits(tensors)
        full = len(self.batches) == self.capacity_batches
        slot = self.batches[0] if full else len(self.batches)   # the oldest batch's slot is overwritten
        rows = slice(slot * self.batch_size, (slot + 1) * self.batch_size)
        for key, value in tensors.items():
            self._write(key, rows, value)
            if _padded(key):
                self._slot_widths[key][slot] = value.shape[1]
        self.batches.append(slot)

    def _allocate(self, tensors: dict[str, torch.Tensor]) -> None:
        if "image_id" not in tensors:
            raise ValueError("a pool batch needs image_id")
        self.batch_size = int(tensors["image_id"].shape[0])
        for key, value in tensors.items():
            shape = list(value.shape)
            shape[0] = self.capacity_rows
            if _padded(key):
                shape[1] = max(shape[1], _max_width(key, self.widths) or 0)
                self._slot_widths[key] = [0] * self.capacity_batches
            self._store[key] = torch.full(shape, pad_value(key), dtype=value.dtype)

    def _check_fits(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self._store):
            raise ValueError(f"pool batch keys {sorted(tensors)} differ from the first batch's {sorted(self._store)}")
        for key, value in tensors.items():
            store = self._store[key]
            fixed = slice(2, None) if _padded(key) else slice(1, None)
            if (value.shape[0] != self.batch_size or value.shape[fixed] != store.shape[fixed]
                    or value.dtype != store.dtype):
                raise ValueError(f"pool batch {key} {tuple(value.shape)} {value.dtype} does not fit the pool's "
                                 f"{tuple(store.shape)} {store.dtype} (batches of {self.batch_size})")

    def _write(self, key: str, rows: slice, value: torch.Tensor) -> None:
        store = self._store[key]
        if not _padded(key):
            store[rows].copy_(value)
            return
        width = value.shape[1]
        if width > store.shape[1]:
            store = self._grow(key, width)
        store[rows, :width].copy_(value)
        store[rows, width:].fill_(pad_value(key))

    def _grow(self, key: str, width: int) -> torch.Tensor:
        """Reallocate ``key`` wider (only where its maximum width was not given or a batch exceeds it)."""
        old = self._store[key]
        new = torch.full((old.shape[0], width, *old.shape[2:]), pad_value(key), dtype=old.dtype)
        new[:, :old.shape[1]] = old
        self._store[key] = new
        return new

    # ---- reading ---------------------------------------------------------------------------------
    def _physical(self, index: torch.Tensor) -> torch.Tensor:
        """Storage rows of pool rows ``index`` (row 0 = the oldest sample held)."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"pool rows must be in 0..{len(self) - 1}")
        return (self.batches[0] * self.batch_size + index) % self.capacity_rows

    def _width(self, key: str) -> int:
        return max(self._slot_widths[key][slot] for slot in self.batches)

    def _gather(self, keys: tuple[str, ...], index: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = self._physical(index)
        out = {}
        for key in keys:
            if key in self._store:
                store = self._store[key]
                out[key] = (store[:, :self._width(key)] if _padded(key) else store)[rows]
        return out

    def image_ids(self) -> torch.Tensor:
        if not self.batches:
            return torch.zeros(0, dtype=torch.long)
        return self._store["image_id"][self._physical(torch.arange(len(self)))]

    def images(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._gather(IMAGE_KEYS, index)

    def texts(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._gather(TEXT_KEYS, index)

    def draw_per_anchor(self, anchor_ids: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """Pool rows [A, n]: for each anchor its own ``n`` distinct random candidates of another image id
        (the authors draw fresh random negatives per anchor). One random key per (anchor, row); rows of
        the anchor's own image get key 2 and are never among the ``n`` smallest while enough others exist."""
        ids = self.image_ids()
        valid = candidate_valid(anchor_ids.cpu(), ids)
        short = int((valid.sum(1) < n).sum())
        if short:
            raise UserError(f"the hard-negative pool holds {len(ids)} candidates, fewer than "
                            f"finetune.negative_size ({n}) with another image id for {short} anchor(s): raise "
                            f"finetune.pool_size or lower finetune.negative_size")
        keys = torch.rand(valid.shape, generator=generator).masked_fill_(~valid, 2.0)
        return keys.topk(n, dim=1, largest=False, sorted=False).indices


def pool_batches(pool_size: int, micro_batch_size: int) -> int:
    """Batches the pool holds: ``finetune.pool_size`` samples rounded up to whole micro-batches."""
    return math.ceil(pool_size / micro_batch_size)


def pool_bytes(cfg, feat_dim: Optional[int] = None) -> int:
    """Upper bound of the pool's memory per rank (bytes): pool_size rounded up to whole micro-batches, each
    row at data.max_text_len tokens and, by image mode, 3 x image_size^2 float pixels (patch; roi adds
    max_regions boxes) or max_regions x feat_dim float features (features), with 7-d float positions and a
    mask per region. ``feat_dim`` defaults to the model config's."""
    d, mbs = cfg.data, cfg.train.micro_batch_size
    rows = cfg.finetune.pool_size if mbs == "auto" else pool_batches(cfg.finetune.pool_size, mbs) * mbs
    per_row = 8 + d.max_text_len * TEXT_ROW_BYTES   # image_id + text keys
    if d.image_mode != "features":
        per_row += 3 * d.image_size ** 2 * 4
    if d.image_mode != "patch":
        region = 4 if d.image_mode == "roi" else _feat_dim(cfg, feat_dim)
        per_row += d.max_regions * ((region + POS_DIM) * 4 + 1)
    return rows * per_row


def _feat_dim(cfg, feat_dim: Optional[int]) -> int:
    if feat_dim is not None:
        return feat_dim
    from pipeline.train.build import model_config
    return model_config(cfg).image.feat_dim


def index_tokens(tokens: ImageTokens, index: torch.Tensor) -> ImageTokens:
    return ImageTokens(tokens.feat[index], tokens.pos[index], tokens.mask[index])


def text_rows(texts: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in texts.items()}


@torch.no_grad()
def score_grid(score_fn: Callable[[dict, ImageTokens], torch.Tensor], texts: dict, tokens: ImageTokens,
               text_idx: torch.Tensor, image_idx: torch.Tensor, chunk: int) -> torch.Tensor:
    """Scores of the pairs (texts[text_idx[a, c]], tokens[image_idx[a, c]]) -> [A, C].

    The number of ``score_fn`` calls depends only on the grid shape, so ranks with equal shapes make equal
    numbers of calls (ZeRO-3 gathers parameters collectively in every forward).
    """
    flat_t, flat_i = text_idx.reshape(-1), image_idx.reshape(-1)
    out = []
    for s in range(0, flat_t.numel(), chunk):
        t, i = flat_t[s:s + chunk], flat_i[s:s + chunk]
        out.append(score_fn(text_rows(texts, t), index_tokens(tokens, i)).float())
    return torch.cat(out).view(text_idx.shape)


def margin_rank_loss(pos: torch.Tensor, neg: torch.Tensor, margin: float) -> torch.Tensor:
    """mean_k max(0, margin + sigmoid(neg_k) - sigmoid(pos)) over groups; pos [A], neg [A, k] are logits."""
    return torch.relu(margin + torch.sigmoid(neg) - torch.sigmoid(pos).unsqueeze(1)).mean()


def iais_schedule(kind: str, step: int, total: int) -> float:
    """s(t) of DESIGN.md, t = optimizer step, T = total steps."""
    import math
    x = min(max(step / max(total, 1), 0.0), 1.0)
    if kind == "exp":
        return math.exp(5.0 * (x - 1.0))
    if kind == "linear":
        return x
    if kind == "log":
        return 1.0 - math.exp(-5.0 * x)
    return 1.0


def candidate_valid(anchor_ids: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """[A, C]: candidate c may serve as a negative of anchor a (a different image id)."""
    return anchor_ids.unsqueeze(1) != cand_ids.unsqueeze(0)
