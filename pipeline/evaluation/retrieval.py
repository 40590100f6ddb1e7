"""Full and two-stage cross-encoder retrieval, and the sharding every evaluation stage shares.

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
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from models.image_encoder import ImageTokens
from pipeline import distributed as ddp
from pipeline.config import EvalConfig
from pipeline.data.eval_split import EvalData
from pipeline.evaluation.metrics import retrieval_recalls


# ----------------------------------------------------------------------------- sharding

def device_of(model: torch.nn.Module) -> torch.device:
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
    device = device_of(model)
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


def sync_time() -> float:
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
    t0 = sync_time()
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
    seconds = sync_time() - t0
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
    device = device_of(model)
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
    t0 = sync_time()
    sim = itc_similarity(model, data, cfg)
    t1 = sync_time()
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
    t2 = sync_time()
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
