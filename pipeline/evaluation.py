"""Retrieval evaluation: full and two-stage cross-encoder retrieval, ISD/ISDa, Winoground scores.

Work is split across the ranks of an initialised process group (any subset of it: every rank
must call the same functions in the same order). Every rank runs the SAME number of model
calls in every stage because under ZeRO-3 each forward gathers parameters collectively; the
last rank's short slice is padded with dummy work whose results are dropped.

Pass the bare ``nn.Module`` (``engine.module`` for a DeepSpeed engine): evaluation only calls
its methods (encode_image / forward / score / embed_text / embed_image), never the engine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from models import iais
from models.image_encoder import ImageTokens
from pipeline import distributed as ddp
from pipeline.errors import UserError
from pipeline.eval_data import EvalData
from pipeline.metrics import retrieval_recalls, winoground_scores

ALIGNMENTS = ("singular", "distributed", "congruence")
SIDES = ("L", "V")


@dataclass
class EvalConfig:
    """What to evaluate and with which batch sizes.

    score_batch: (text, image) pairs per cross-encoder forward. encode_batch: images per
    encode_image call and texts/images per ITC embedding call. image_block: images whose backbone
    tokens a rank holds at once in full retrieval (bounds memory; each image is still encoded once). two_stage_k: images shortlisted per
    text query by the ITC dual encoder (16 demo, 128 as ALBEF on Flickr30k); two_stage_k_texts:
    texts shortlisted per image query (None: the same k, as ALBEF). isd_max_pairs: matched pairs
    used for ISD/ISDa (evenly spaced over the captions; None = all). pictures: how many pairs /
    queries get a PNG (0 = none).
    """

    full: bool = True
    two_stage: bool = True
    score_batch: int = 128
    encode_batch: int = 64
    image_block: int = 1024
    two_stage_k: int = 16
    two_stage_k_texts: int | None = None
    isd_alignments: tuple[str, ...] = ALIGNMENTS
    isd_sides: tuple[str, ...] = SIDES
    isd_layer: int = -1
    isd_max_pairs: int | None = 256
    winoground: bool = True
    pictures: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("score_batch", "encode_batch", "image_block", "two_stage_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"eval.{name}={value!r}: give a positive int")
        if self.two_stage_k_texts is not None and (not isinstance(self.two_stage_k_texts, int)
                                                   or self.two_stage_k_texts < 1):
            raise UserError(f"eval.two_stage_k_texts={self.two_stage_k_texts!r}: give a positive int or null")
        if self.isd_max_pairs is not None and (not isinstance(self.isd_max_pairs, int)
                                               or self.isd_max_pairs < 0):
            raise UserError(f"eval.isd_max_pairs={self.isd_max_pairs!r}: give an int >= 0 or null (all)")
        self.isd_alignments = tuple(self.isd_alignments)
        self.isd_sides = tuple(self.isd_sides)
        bad = [a for a in self.isd_alignments if a not in ALIGNMENTS]
        if bad:
            raise UserError(f"eval.isd_alignments contains {bad}: use any of {list(ALIGNMENTS)}")
        bad = [s for s in self.isd_sides if s not in SIDES]
        if bad:
            raise UserError(f"eval.isd_sides contains {bad}: use any of {list(SIDES)}")
        if not isinstance(self.pictures, int) or self.pictures < 0:
            raise UserError(f"eval.pictures={self.pictures!r}: give an int >= 0")


@dataclass
class EvalResult:
    """metrics: flat dict of floats (recalls, ISD, Winoground, pairs/s); timings: seconds per stage;
    scores: the full (or two-stage text->image) score matrix when computed (rank 0 and others alike)."""

    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    two_stage_scores: tuple[torch.Tensor, torch.Tensor] | None = None


# ----------------------------------------------------------------------------- sharding

def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def images_for(model, data: EvalData, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image inputs of images ``idx`` on the model's device, floats in the model's dtype (bf16 engines)."""
    param = next(model.parameters())
    return data.image_inputs(idx, param.device, param.dtype)


def _world_rank() -> tuple[int, int]:
    return (ddp.world_size(), ddp.rank()) if ddp.is_initialized() else (1, 0)


def _slice_bounds(n: int, world: int, r: int) -> tuple[int, int]:
    per = math.ceil(n / world) if n else 0
    return min(n, r * per), min(n, (r + 1) * per)


def _gather_rows(local: torch.Tensor, per: int) -> torch.Tensor:
    """Concatenate every rank's first-dim slice (each padded to ``per`` rows) in rank order."""
    if not ddp.is_initialized() or ddp.world_size() == 1:
        return local
    padded = local.new_zeros((per,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    if "nccl" in str(dist.get_backend()).lower() and padded.device.type != "cuda":
        padded = padded.cuda()
    parts = [torch.empty_like(padded) for _ in range(ddp.world_size())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p.to(local.device) for p in parts], dim=0)


def sharded_map(order: torch.Tensor, batch_size: int, fn: Callable[[torch.Tensor], torch.Tensor],
                desc: str = "", progress: bool = True) -> torch.Tensor:
    """Apply ``fn`` to batches of the items listed in ``order`` split across ranks; gather the rows.

    ``fn(idx)`` returns a tensor whose first dim matches ``idx``. Each rank takes a contiguous
    slice of ``order``; all ranks make the same number of ``fn`` calls (empty batches are
    replaced by a dummy call on ``order[:1]`` whose output is dropped). The result is indexed by
    position in ``order`` (row i belongs to item ``order[i]``), identical on every rank.
    """
    world, r = _world_rank()
    n = order.numel()
    lo, hi = _slice_bounds(n, world, r)
    per = math.ceil(n / world) if n else 0
    calls = max(1, math.ceil(per / batch_size))
    if n == 0:
        raise ValueError("sharded_map: nothing to compute")
    outs: list[torch.Tensor] = []
    bar = tqdm(total=hi - lo, desc=desc, disable=not (progress and r == 0), leave=False, unit="it")
    for c in range(calls):
        idx = order[lo + c * batch_size: min(hi, lo + (c + 1) * batch_size)]
        real = idx.numel() > 0
        out = fn(idx if real else order[:1]).detach()  # dummy call keeps collectives aligned
        outs.append(out if real else out[:0])
        bar.update(idx.numel())
    bar.close()
    return _gather_rows(torch.cat(outs, dim=0), per)[:n]


# ----------------------------------------------------------------------------- image tokens

def _take(tokens: ImageTokens, rows: torch.Tensor, width: int | None) -> ImageTokens:
    """Rows of cached ImageTokens; image padding trimmed to ``width`` tokens (real tokens come first)."""
    m = tokens.mask.shape[1] if width is None else max(1, min(width, tokens.mask.shape[1]))
    return ImageTokens(tokens.feat[rows, :m], tokens.pos[rows, :m], tokens.mask[rows, :m])


def _cat_tokens(parts: list[ImageTokens]) -> ImageTokens:
    m = max(p.mask.shape[1] for p in parts)

    def pad(x: torch.Tensor, value) -> torch.Tensor:
        if x.shape[1] == m:
            return x
        shape = (x.shape[0], m - x.shape[1]) + tuple(x.shape[2:])
        return torch.cat([x, x.new_full(shape, value)], dim=1)

    return ImageTokens(torch.cat([pad(p.feat, 0) for p in parts]), torch.cat([pad(p.pos, 0) for p in parts]),
                       torch.cat([pad(p.mask, False) for p in parts]))


def encode_images(model, data: EvalData, images: torch.Tensor, calls: int, batch_size: int) -> ImageTokens:
    """Run the image backbone once per image in ``images``; exactly ``calls`` encode_image calls
    (extra calls re-encode the first batch and are dropped, for ZeRO-3 alignment)."""
    parts: list[ImageTokens] = []
    for c in range(calls):
        idx = images[c * batch_size:(c + 1) * batch_size]
        if idx.numel() == 0:
            model.encode_image(images_for(model, data, images[:1]))
            continue
        parts.append(model.encode_image(images_for(model, data, idx)))
    if not parts:
        return ImageTokens(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.bool))
    return _cat_tokens(parts)


# ----------------------------------------------------------------------------- pair scoring
#
# Both scoring paths enumerate a rank's pairs in the same order: captions by (length, index), then images by
# (real-token count, index), cut into batches of ``score_batch`` pairs. Text padding is then minimal and the
# image padding of a batch is trimmed to its widest image; with one rank and every pair, the two paths run
# identical batches, so two-stage retrieval with k = n_images reproduces full retrieval bit for bit.

def _image_order(data: EvalData) -> torch.Tensor:
    return torch.argsort(data.region_counts(), stable=True)


def _score_batch(model, data: EvalData, tokens: ImageTokens, captions: torch.Tensor, token_rows: torch.Tensor,
                 images: torch.Tensor) -> torch.Tensor:
    """Rank logits of the pairs (captions[j], images[j]) whose image tokens are tokens[token_rows[j]]."""
    device = _device_of(model)
    width = int(data.region_counts()[images].max()) if "region_mask" in data.images else None
    texts = data.text_inputs(captions, device)
    return model.score(texts, image_tokens=_take(tokens, token_rows.to(device, non_blocking=True), width)).float()


def score_pairs(model, data: EvalData, pairs: torch.Tensor, cfg: EvalConfig,
                desc: str = "scoring") -> torch.Tensor:
    """Cross-encoder rank logits of (text, image) ``pairs`` [P, 2] -> float32 [P] (CPU), on all ranks.

    Pairs are split evenly across ranks (image-major, so each rank needs few images); the backbone runs
    once per image per rank and its ImageTokens are reused for every pair.
    """
    world, r = _world_rank()
    img_rank = torch.empty(data.n_images, dtype=torch.long)
    img_rank[_image_order(data)] = torch.arange(data.n_images)
    order = torch.argsort(img_rank[pairs[:, 1]], stable=True)
    ordered = pairs[order]
    n = ordered.shape[0]
    bounds = [_slice_bounds(n, world, q) for q in range(world)]
    needed = [torch.unique(ordered[lo:hi, 1]) for lo, hi in bounds]
    needed = [x[torch.argsort(img_rank[x], stable=True)] for x in needed]
    calls = max(1, max(math.ceil(x.numel() / cfg.encode_batch) for x in needed))
    mine = needed[r] if needed[r].numel() else ordered[:1, 1]
    tokens = encode_images(model, data, mine, calls, cfg.encode_batch)
    row_of = torch.zeros(data.n_images, dtype=torch.long)  # other ranks' images (dummy calls) -> row 0
    row_of[mine] = torch.arange(mine.numel())

    def fn(pos: torch.Tensor) -> torch.Tensor:
        chunk = ordered[pos]
        return _score_batch(model, data, tokens, chunk[:, 0], row_of[chunk[:, 1]], chunk[:, 1])

    perm = torch.cat([_caption_major(data, ordered, torch.arange(lo, hi), img_rank) for lo, hi in bounds])
    out = sharded_map(perm, cfg.score_batch, fn, desc=desc, progress=cfg.progress).cpu()
    scores = torch.empty(n, dtype=torch.float32)
    scores[order[perm]] = out
    return scores


def _caption_major(data: EvalData, ordered: torch.Tensor, pos: torch.Tensor, img_rank: torch.Tensor
                   ) -> torch.Tensor:
    """Positions ``pos`` of ``ordered`` pairs re-sorted by (caption length, caption, image rank)."""
    text, image = ordered[pos, 0], ordered[pos, 1]
    key = (data.text_lengths()[text] * (data.n_texts + 1) + text) * (data.n_images + 1) + img_rank[image]
    return pos[torch.argsort(key, stable=True)]


def _sync_time() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    ddp.barrier()
    return time.perf_counter()


def full_retrieval(model, data: EvalData, cfg: EvalConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Score every (text, image) pair -> ([n_texts, n_images] matrix, stats with time and pairs/s).

    Each rank scores every caption against its own slice of the images, ``cfg.image_block`` images at a
    time (only their tokens are held); pairs are enumerated on the fly (never materialised: COCO's
    25k x 5k would be 125M pairs) and the slices' columns are gathered.
    """
    t0 = _sync_time()
    world, r = _world_rank()
    image_order = _image_order(data)
    per = math.ceil(data.n_images / world)
    slices = [image_order[q * per:(q + 1) * per] for q in range(world)]
    block = cfg.image_block
    bar = tqdm(total=data.n_texts * slices[r].numel(), desc="full retrieval", leave=False, unit="pair",
               disable=not (cfg.progress and r == 0))
    columns = []
    for start in range(0, max(1, per), block):
        images = slices[r][start:start + block]
        widest = max(x[start:start + block].numel() for x in slices)   # the block size on the fullest rank
        encoded = images if images.numel() else image_order[:1]   # a rank without images makes dummy calls
        tokens = encode_images(model, data, encoded, max(1, math.ceil(widest / cfg.encode_batch)), cfg.encode_batch)
        columns.append(_score_captions_against(model, data, tokens, encoded, widest, cfg, bar)[:, :images.numel()])
        del tokens
    bar.close()
    local = torch.cat(columns, dim=1)   # [n_texts, this rank's images]
    gathered = _gather_rows(local.T.contiguous(), per)[:data.n_images]   # [n_images, n_texts]
    scores = torch.empty(data.n_texts, data.n_images, dtype=torch.float32)
    scores[:, image_order] = gathered.T.cpu()
    seconds = _sync_time() - t0
    n_pairs = data.n_texts * data.n_images
    return scores, {"full_seconds": seconds, "full_pairs_per_s": n_pairs / max(seconds, 1e-9)}


def _score_captions_against(model, data: EvalData, tokens: ImageTokens, images: torch.Tensor, widest: int,
                            cfg: EvalConfig, bar) -> torch.Tensor:
    """Scores [n_texts, m] of every caption against the m ``images`` whose tokens are ``tokens``; exactly
    ceil(n_texts * widest / score_batch) model calls on every rank (the surplus repeats the first batch)."""
    captions = torch.argsort(data.text_lengths(), stable=True)
    m = images.numel()
    n = data.n_texts * m
    out = torch.empty(n, dtype=torch.float32)
    for c in range(max(1, math.ceil(data.n_texts * widest / cfg.score_batch))):
        pos = torch.arange(c * cfg.score_batch, min(n, (c + 1) * cfg.score_batch))
        real = pos.numel() > 0
        if not real:
            pos = torch.arange(min(n, cfg.score_batch))
        rows = pos % m
        scores = _score_batch(model, data, tokens, captions[pos // m], rows, images[rows])
        if real:
            out[pos] = scores.cpu()
            bar.update(pos.numel())
    result = torch.empty(data.n_texts, m, dtype=torch.float32)
    result[captions] = out.view(data.n_texts, m)
    return result


# ----------------------------------------------------------------------------- two-stage

def itc_similarity(model, data: EvalData, cfg: EvalConfig) -> torch.Tensor:
    """ITC dual-encoder cosine similarities [n_texts, n_images] (text-only and image-only passes)."""
    device = _device_of(model)
    text_order = torch.argsort(data.text_lengths(), stable=True)
    text_emb = sharded_map(text_order, cfg.encode_batch,
                           lambda idx: model.embed_text(data.text_inputs(idx, device)).float(),
                           desc="ITC texts", progress=cfg.progress)
    text_emb = text_emb[torch.argsort(text_order)]
    image_order = torch.argsort(data.region_counts(), stable=True)
    image_emb = sharded_map(image_order, cfg.encode_batch,
                            lambda idx: model.embed_image(images_for(model, data, idx)).float(),
                            desc="ITC images", progress=cfg.progress)
    image_emb = image_emb[torch.argsort(image_order)]
    return (text_emb @ image_emb.T).cpu()


def two_stage_retrieval(model, data: EvalData, cfg: EvalConfig
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """ITC shortlist then cross-encoder re-ranking (ALBEF style).

    Returns (t2i, i2t, stats): ``t2i`` [n_texts, n_images] holds cross-encoder scores of each text's
    top-k images and -inf elsewhere (used for image retrieval, img_rK); ``i2t`` the same for each
    image's top-k texts (text retrieval, txt_rK). Pairs shortlisted in both directions are scored once.
    With k >= n_images and k_texts >= n_texts every pair is scored and both equal full retrieval;
    with k >= n_images alone ``t2i`` equals the full matrix. The backbone runs once per image in
    each stage (ITC image pass, then the re-ranked images' tokens).
    """
    t0 = _sync_time()
    sim = itc_similarity(model, data, cfg)
    t1 = _sync_time()
    k_img = min(cfg.two_stage_k, data.n_images)
    k_txt = min(cfg.two_stage_k_texts or cfg.two_stage_k, data.n_texts)
    in_t2i = torch.zeros_like(sim, dtype=torch.bool)
    in_t2i.scatter_(1, sim.topk(k_img, dim=1).indices, True)
    in_i2t = torch.zeros_like(sim, dtype=torch.bool)
    in_i2t.scatter_(0, sim.topk(k_txt, dim=0).indices, True)
    pairs = (in_t2i | in_i2t).nonzero()
    scores = score_pairs(model, data, pairs, cfg, desc="two-stage re-rank")
    dense = torch.full(sim.shape, float("-inf"))
    dense[pairs[:, 0], pairs[:, 1]] = scores
    neg_inf = torch.full_like(dense, float("-inf"))
    t2i = torch.where(in_t2i, dense, neg_inf)
    i2t = torch.where(in_i2t, dense, neg_inf)
    t2 = _sync_time()
    return t2i, i2t, {"two_stage_itc_seconds": t1 - t0, "two_stage_rerank_seconds": t2 - t1,
                      "two_stage_seconds": t2 - t0, "two_stage_pairs": float(pairs.shape[0])}


def two_stage_recalls(t2i: torch.Tensor, i2t: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """Recalls with img_rK from the text-query matrix and txt_rK from the image-query matrix."""
    a = retrieval_recalls(t2i, text_to_image)
    b = retrieval_recalls(i2t, text_to_image)
    out = {k: v for k, v in b.items() if k.startswith("txt_")}
    out.update({k: v for k, v in a.items() if k.startswith("img_")})
    values = list(out.values())
    out["rsum"] = float(sum(values))
    out["r_mean"] = out["rsum"] / len(values)
    return out


# ----------------------------------------------------------------------------- ISD / ISDa

def _isd_captions(data: EvalData, cfg: EvalConfig) -> torch.Tensor:
    n = data.n_texts
    m = n if cfg.isd_max_pairs is None else min(n, cfg.isd_max_pairs)
    if m == 0:
        return torch.zeros(0, dtype=torch.long)
    picked = torch.linspace(0, n - 1, m).round().long().unique()
    return picked[torch.argsort(data.text_lengths()[picked], stable=True)]


def region_targets(data: EvalData, captions: torch.Tensor, tokens: ImageTokens, text_len: int,
                   mode: str) -> torch.Tensor:
    """[B, T + M] sequence position of each word token's annotated region, -1 if none or unmatched.

    features and roi: each object goes to the region whose box (ImageTokens.pos[..., :4], normalised x1, y1,
    x2, y2) has the best IoU with the object's box, if that IoU is >= ``MATCH_IOU`` (roi without object boxes:
    object k is region token k). patch: the patch whose cell contains the object's box centre.
    """
    b, m = tokens.mask.shape
    objs = data.token_object_rows(captions, text_len)  # [B, T]
    pos, mask = tokens.pos.detach().float().cpu(), tokens.mask.cpu()
    slots = torch.full_like(objs, -1)
    for row, cap in enumerate(captions.tolist()):
        table = _object_slots(data, int(data.text_to_image[cap]), pos[row], mask[row], mode,
                              int(objs[row].max()) + 1)
        slots[row] = torch.where(objs[row] >= 0, table[objs[row].clamp_min(0)], slots[row])
    targets = torch.where(slots >= 0, slots + text_len, slots)
    return torch.cat([targets, torch.full((b, m), -1, dtype=torch.long)], dim=1)


MATCH_IOU = 0.5


def _object_slots(data: EvalData, image: int, pos: torch.Tensor, mask: torch.Tensor, mode: str,
                  n_objects: int) -> torch.Tensor:
    """[max(n_objects, 1)] image-token index of objects 0..n_objects-1 of ``image``, -1 when none matches."""
    table = torch.full((max(n_objects, 1),), -1, dtype=torch.long)
    if mode == "patch":
        found = _cells_of_centres(data.object_centres[image], pos, mask) if data.object_centres else None
    elif data.object_boxes:   # roi boxes may come from an .npz too, so both region modes match by IoU
        found = _best_iou_regions(data.object_boxes[image], pos[:, :4], mask)
    elif mode == "roi":   # boxes of the annotated objects, in their order
        found = torch.arange(min(n_objects, mask.numel()))
        found = torch.where(mask[found], found, -1)
    else:
        found = None
    if found is not None:
        k = min(found.numel(), table.numel())
        table[:k] = found[:k]
    return table


def _cells_of_centres(centres: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[k] first real token whose cell contains centre k (x1 <= x < x2, y1 <= y < y2), -1 if none."""
    x, y = centres[:, :1], centres[:, 1:2]
    inside = (pos[None, :, 0] <= x) & (x < pos[None, :, 2]) & (pos[None, :, 1] <= y) & (y < pos[None, :, 3])
    inside &= mask[None, :]
    return torch.where(inside.any(1), inside.to(torch.uint8).argmax(1), -1)


def _best_iou_regions(objects: torch.Tensor, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[k] real region with the best IoU with object box k if that IoU >= MATCH_IOU (first on ties), else -1.
    Boxes normalised x1, y1, x2, y2; a missing object box (-1s) has no area and matches nothing."""
    iou = _box_iou(objects, regions).masked_fill(~mask[None, :], -1.0)
    if iou.shape[1] == 0:
        return torch.full((objects.shape[0],), -1, dtype=torch.long)
    best, index = iou.max(1)
    return torch.where(best >= MATCH_IOU, index, -1)


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[k, m] IoU of boxes a [k, 4] and b [m, 4] (x1, y1, x2, y2); 0 where the union is empty."""
    def area(x: torch.Tensor) -> torch.Tensor:
        return (x[:, 2] - x[:, 0]).clamp_min(0) * (x[:, 3] - x[:, 1]).clamp_min(0)

    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp_min(0).prod(-1)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def _annotated_word_counts(data: EvalData, captions: torch.Tensor, word_mask: torch.Tensor,
                           text_len: int) -> torch.Tensor:
    """[B] words with an object annotation in the sequence, matched to a region or not."""
    objs = data.token_object_rows(captions, text_len).to(word_mask.device)
    return ((objs >= 0) & word_mask[:, :text_len]).sum(1)


def isd_metrics(model, data: EvalData, cfg: EvalConfig) -> dict[str, float]:
    """Paper-faithful ISD per alignment and side on matched pairs (``isd_<alignment>_<side>``, what IAIS
    minimises) and, when annotated, the annotation-based metrics:

    - ``isda``: relation consistency ``iais.isd_annotated`` (0 = the annotated words relate to each other
      as their regions do), mean over pairs with >= 1 matched annotated word (``isda_pairs`` of them);
    - ``isda_words`` / ``isda_words_annotated``: annotated words matched to a region / annotated words;
    - ``grounding_acc``: percent of matched annotated words whose S_LV row argmax is their region.
    """
    device = _device_of(model)
    captions = _isd_captions(data, cfg)
    combos = [(a, s) for a in cfg.isd_alignments for s in cfg.isd_sides]
    if captions.numel() == 0 or not combos:
        return {}
    layer = model.config.logit_layer_indices([cfg.isd_layer])[0]
    annotated = data.has_annotations
    mode = model.config.image.mode

    def fn(idx: torch.Tensor) -> torch.Tensor:
        caps = captions[idx]
        batch = data.text_inputs(caps, device)
        tokens = model.encode_image(images_for(model, data, data.text_to_image[caps]))
        out = model.forward(batch, image_tokens=tokens, attn_logit_layers=[layer])
        logits = out.attn_logits[layer]
        cols = [iais.isd(logits, out.word_mask, out.region_mask, a, s).float() for a, s in combos]
        if annotated:
            cols += _annotation_columns(data, caps, tokens, out, logits, mode)
        return torch.stack(cols, dim=1)

    values = sharded_map(torch.arange(captions.numel()), cfg.encode_batch, fn, desc="ISD",
                         progress=cfg.progress).cpu().double()
    out = {f"isd_{a}_{s}": float(values[:, i].mean()) for i, (a, s) in enumerate(combos)}
    if annotated:
        out.update(_annotation_summary(values[:, len(combos):]))
    return out


def _annotation_columns(data: EvalData, caps: torch.Tensor, tokens: ImageTokens, out, logits: torch.Tensor,
                        mode: str) -> list[torch.Tensor]:
    """Per pair: ISDa, matched annotated words, annotated words, grounding hits (``_annotation_summary``)."""
    targets = region_targets(data, caps, tokens, out.text_len, mode).to(logits.device)
    matched = iais.annotated_words(out.word_mask, out.region_mask, targets).sum(1)
    hits = iais.grounding_hits(logits, out.word_mask, out.region_mask, targets).sum(1)
    return [iais.isd_annotated(logits, out.word_mask, out.region_mask, targets).float(), matched.float(),
            _annotated_word_counts(data, caps, out.word_mask, out.text_len).float(), hits.float()]


def _annotation_summary(columns: torch.Tensor) -> dict[str, float]:
    isda, matched, annotated, hits = columns.unbind(1)
    has = matched > 0
    words = float(matched.sum())
    return {"isda": float(isda[has].mean()) if has.any() else float("nan"), "isda_pairs": float(has.sum()),
            "isda_words": words, "isda_words_annotated": float(annotated.sum()),
            "grounding_acc": 100.0 * float(hits.sum()) / words if words else float("nan")}


# ----------------------------------------------------------------------------- Winoground

def resolve_quadruples(data: EvalData, entries: list[dict], tokenizer=None, max_len: int = 40
                       ) -> tuple[EvalData, list[tuple[int, int, int, int]]]:
    """Map {"image0","caption0","image1","caption1"} entries (image keys, caption strings) to indices.

    A caption found among its image's captions reuses that caption; other caption strings are
    tokenized and appended to a copy of ``data`` (the original is left untouched).
    """
    index, by_image = data.image_rows(), data.caption_rows()
    quads, extra_text, extra_image = [], [], []
    for n, entry in enumerate(entries):
        fields = ("image0", "caption0", "image1", "caption1")
        if not isinstance(entry, dict) or any(k not in entry for k in fields):
            raise UserError(f"quadruple #{n}: expected an object with image0, caption0, image1, caption1")
        row = []
        for side in ("0", "1"):
            key = str(entry["image" + side])
            if key not in index:
                raise UserError(f"quadruple #{n}: image{side}={key!r} is not an image key of the split")
            row.append(index[key])
        caps = []
        for side, img in (("0", row[0]), ("1", row[1])):
            text = str(entry["caption" + side])
            c = by_image.get((img, text))
            if c is None:
                extra_text.append(text)
                extra_image.append(img)
                c = data.n_texts + len(extra_text) - 1
            caps.append(c)
        quads.append((row[0], caps[0], row[1], caps[1]))
    if extra_text:
        data = data.with_captions(extra_text, extra_image, tokenizer, max_len)
    return data, quads


def winoground_metrics(model, data: EvalData, quads: list[tuple[int, int, int, int]],
                       cfg: EvalConfig) -> dict[str, float]:
    """wino_text / wino_image / wino_group (percent) from s[q, i, j] = score(caption_i, image_j)."""
    if not quads:
        return {}
    q = torch.tensor(quads, dtype=torch.long)  # image0, caption0, image1, caption1
    caps, imgs = q[:, [1, 3]], q[:, [0, 2]]
    pairs = torch.stack([caps[:, :, None].expand(-1, 2, 2), imgs[:, None, :].expand(-1, 2, 2)], dim=-1)
    scores = score_pairs(model, data, pairs.reshape(-1, 2), cfg, desc="Winoground").view(-1, 2, 2)
    w = winoground_scores(scores)
    return {"wino_text": w["text"], "wino_image": w["image"], "wino_group": w["group"],
            "wino_quadruples": float(len(quads))}


# ----------------------------------------------------------------------------- all together

def evaluate(model, data: EvalData, cfg: EvalConfig | None = None,
             quadruples: list[tuple[int, int, int, int]] | None = None, picture_dir=None) -> EvalResult:
    """Every enabled evaluation on ``data``; collective: all ranks call it, all get the same metrics.

    ``data``: a split in memory (``pipeline.loader.load_eval_split``).

    Recall keys (txt_rK, img_rK, rsum, r_mean) come from full retrieval, or from two-stage when
    full is off; two-stage values are also reported as ``two_stage_<key>``. ``quadruples`` defaults
    to ``data.quadruples``. PNG pictures go to ``picture_dir`` (rank 0 writes) when given; give it
    on every rank (the pictures' attention forward is collective too).
    """
    cfg = cfg or EvalConfig()
    was_training = model.training
    model.eval()
    result = EvalResult()
    try:
        with torch.no_grad():
            _evaluate_into(result, model, data, cfg, quadruples, picture_dir)
    finally:
        model.train(was_training)
    return result


def _evaluate_into(result: EvalResult, model, data: EvalData, cfg: EvalConfig, quadruples,
                   picture_dir) -> None:
    m, timings = result.metrics, result.timings
    t0 = _sync_time()
    if cfg.full:
        result.scores, stats = full_retrieval(model, data, cfg)
        m.update(retrieval_recalls(result.scores, data.text_to_image))
        timings.update(stats)
    if cfg.two_stage:
        t2i, i2t, stats = two_stage_retrieval(model, data, cfg)
        result.two_stage_scores = (t2i, i2t)
        recalls = two_stage_recalls(t2i, i2t, data.text_to_image)
        m.update({f"two_stage_{k}": v for k, v in recalls.items()})
        if not cfg.full:
            m.update(recalls)
        timings.update(stats)
    t1 = _sync_time()
    m.update(isd_metrics(model, data, cfg))
    t2 = _sync_time()
    timings["isd_seconds"] = t2 - t1
    if cfg.winoground:
        quads = data.quadruples if quadruples is None else quadruples
        m.update(winoground_metrics(model, data, quads, cfg))
    timings["winoground_seconds"] = _sync_time() - t2
    if picture_dir is not None and cfg.pictures > 0:
        from pipeline import pictures  # matplotlib only when pictures are wanted
        ranking = result.scores if result.scores is not None else (
            result.two_stage_scores[0] if result.two_stage_scores is not None else None)
        pictures.write_pictures(model, data, cfg, picture_dir, ranking)
    timings["total_seconds"] = _sync_time() - t0
    m.update(timings)
