"""Pretraining task losses: MLM (15 %, 80/10/10), ITM (random non-matching image for half the pairs, plus
optionally each caption's relation/attribute swap as a negative of its own image), ITC (in-batch contrastive
over text-only and image-only passes, gathered across ranks with gradients), WRA (UNITER's word-region
optimal transport on the ITM pairs), supervised grounding (annotated words predict their object's centre)
and, in region modes, MRFR (masked region feature regression). ITM is UNITER's two-class loss or, with
pretrain.itm_loss bce, a BCE on the match logit against several other images and the swap per caption."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from pipeline import distributed as dist_utils
from pipeline.config import GroundingConfig

TASKS = ("mlm", "itm", "itc", "mrfr", "wra", "grounding")
GROUNDING_LAYER = 0   # the layer whose word->image attention grounding supervises: later layers compose on it


def choose_task(ratios: dict[str, float], seed: int, step: int) -> str:
    """The task of ``step``: a weighted draw seeded by (seed, step), hence the same on every rank."""
    names = [t for t in TASKS if ratios.get(t, 0) > 0]
    rng = random.Random(seed * 1_000_003 + step)
    return rng.choices(names, weights=[ratios[t] for t in names])[0]


def mask_tokens(input_ids: torch.Tensor, word_mask: torch.Tensor, prob: float, mask_id: int, vocab_size: int,
                first_normal_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of word tokens: returns (masked ids, bool positions chosen). At least one per row."""
    rand = torch.rand(input_ids.shape, generator=generator)
    chosen = (rand < prob) & word_mask
    # rows without a chosen token get their first word masked so every row contributes
    none = ~chosen.any(dim=1) & word_mask.any(dim=1)
    first = word_mask.float().argmax(dim=1)
    chosen[none, first[none]] = True
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(first_normal_id, vocab_size, input_ids.shape, generator=generator)
    out = input_ids.clone()
    out[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    out[swap] = random_ids[swap]
    return out, chosen


def mlm_loss(module, batch: dict, tokenizer, prob: float, generator: torch.Generator) -> torch.Tensor:
    from models.retrieval import word_mask_of
    ids = batch["input_ids"].cpu()
    word_mask = word_mask_of(batch["text_mask"].cpu().bool())
    masked, chosen = mask_tokens(ids, word_mask, prob, tokenizer.mask_id, module.config.vocab_size,
                                 max(tokenizer.mask_id, tokenizer.sep_id, tokenizer.cls_id) + 1, generator)
    device = batch["input_ids"].device
    out = module({**batch, "input_ids": masked.to(device)}, attn_logit_layers=[])
    logits = module.mlm_logits(out.sequence, chosen.to(device))
    return F.cross_entropy(logits.float(), ids[chosen].to(device))


def itm_permutation(image_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image row for each text, label 1=match): half the pairs get another image with a different id."""
    b = image_ids.shape[0]
    rows = torch.arange(b)
    negative = torch.rand(b, generator=generator) < 0.5
    for i in torch.nonzero(negative).flatten().tolist():
        options = torch.nonzero(image_ids != image_ids[i]).flatten()
        if options.numel() == 0:
            negative[i] = False
            continue
        rows[i] = options[torch.randint(options.numel(), (1,), generator=generator)].item()
    return rows, (~negative).long()


def itm_pairs(batch: dict, generator: torch.Generator, swaps: bool) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(texts, image row per text, label 1=match): the ITM permutation of the batch; with ``swaps``, half of
    the negatives whose caption has a swapped version become (swapped caption, own image) instead, so the
    classes stay balanced (extra swap negatives on top tip ITM into always answering "no match")."""
    rows, labels = itm_permutation(batch["image_id"].cpu(), generator)
    texts = {"input_ids": batch["input_ids"], "text_mask": batch["text_mask"]}
    if swaps and "has_swap" in batch:
        from pipeline.train.negatives import pad_cat
        coin = torch.rand(labels.shape, generator=generator) < 0.5
        use = (labels == 0) & batch["has_swap"].cpu() & coin
        device = batch["input_ids"].device
        ids = pad_cat([batch["input_ids"], batch["swap_input_ids"]], 0)
        mask = pad_cat([batch["text_mask"], batch["swap_text_mask"]], False)
        b = labels.shape[0]
        pick = (torch.arange(b) + use.long() * b).to(device)   # row i, or its swap at row b + i
        texts = {"input_ids": ids[pick], "text_mask": mask[pick]}
        rows = torch.where(use, torch.arange(b), rows)
    return texts, rows, labels


def itm_loss(module, batch: dict, generator: torch.Generator, swaps: bool = False) -> tuple[torch.Tensor, float]:
    texts, rows, labels = itm_pairs(batch, generator, swaps)
    device = batch["input_ids"].device
    tokens = module.encode_image(batch)
    from pipeline.train.negatives import index_tokens
    logits = module.itm_logits(texts, image_tokens=index_tokens(tokens, rows.to(device))).float()
    labels = labels.to(device)
    acc = (logits.argmax(dim=1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels), acc


def itm_bce_pairs(batch: dict, generator: torch.Generator, other_images: int,
                  swaps: bool) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(texts, image row per text, label 1=match, counted) of BCE ITM: every caption with its own image, with
    ``other_images`` other images of the batch (rows rolled by distinct random shifts) and, with ``swaps``,
    its relation/attribute swap with its own image. A rolled pair that lands on another caption of the same
    image is not counted."""
    from pipeline.train.negatives import pad_cat
    ids = batch["image_id"].cpu()
    b = ids.shape[0]
    shifts = 1 + torch.randperm(b - 1, generator=generator)[:other_images]
    own = torch.arange(b)
    rows = torch.cat([own] + [(own + s) % b for s in shifts.tolist()])
    text_rows = own.repeat(1 + len(shifts))
    labels = torch.cat([torch.ones(b), torch.zeros(b * len(shifts))])
    counted = (labels == 1) | (ids[text_rows] != ids[rows])
    at = text_rows.to(batch["input_ids"].device)
    input_ids, masks = [batch["input_ids"][at]], [batch["text_mask"][at]]
    if swaps and "has_swap" in batch:   # every swap is a negative of its own image, hence always counted
        swapped = torch.nonzero(batch["has_swap"].cpu()).flatten()
        index = swapped.to(batch["input_ids"].device)
        input_ids.append(batch["swap_input_ids"][index])
        masks.append(batch["swap_text_mask"][index])
        rows = torch.cat([rows, swapped])
        labels = torch.cat([labels, torch.zeros(len(swapped))])
        counted = torch.cat([counted, torch.ones(len(swapped), dtype=torch.bool)])
    texts = {"input_ids": pad_cat(input_ids, 0), "text_mask": pad_cat(masks, False)}
    return texts, rows, labels, counted


def itm_bce_loss(module, batch: dict, generator: torch.Generator, other_images: int,
                 swaps: bool) -> tuple[torch.Tensor, float]:
    """(BCE of the ITM match logit over :func:`itm_bce_pairs`, accuracy of its sign). The match logit is
    what fine-tuning's rank head starts from (init_rank_from_itm)."""
    from pipeline.train.negatives import index_tokens
    texts, rows, labels, counted = itm_bce_pairs(batch, generator, other_images, swaps)
    device = batch["input_ids"].device
    tokens = index_tokens(module.encode_image(batch), rows.to(device))
    match = module.itm_logits(texts, image_tokens=tokens)[:, 1].float()
    labels, counted = labels.to(device), counted.to(device)
    loss = F.binary_cross_entropy_with_logits(match[counted], labels[counted])
    acc = ((match[counted] > 0).float() == labels[counted]).float().mean().item()
    return loss, acc


def wra_task_loss(module, batch: dict, generator: torch.Generator, swaps: bool = False) -> torch.Tensor:
    """UNITER's WRA: optimal-transport distance between word and image output tokens, lowered on matched
    and raised on mismatched ITM pairs."""
    from models.ot import wra_loss
    from pipeline.train.negatives import index_tokens
    texts, rows, labels = itm_pairs(batch, generator, swaps)
    device = batch["input_ids"].device
    tokens = index_tokens(module.encode_image(batch), rows.to(device))
    out = module(texts, image_tokens=tokens, attn_logit_layers=[])
    return wra_loss(out.sequence, out.word_mask, out.region_mask, labels.to(device).bool())


def grounding_regions(pos: torch.Tensor, region_mask: torch.Tensor, centres: torch.Tensor,
                      grounded: torch.Tensor) -> torch.Tensor:
    """Per word [B, T]: the image token (patch or region) holding its object's centre, the smallest such
    when several do; -1 for words without an annotated object (or whose centre no token holds)."""
    x, y = centres[..., 0].unsqueeze(-1), centres[..., 1].unsqueeze(-1)          # [B, T, 1]
    x1, y1, x2, y2 = (pos[..., i].unsqueeze(1) for i in range(4))                  # [B, 1, M]
    inside = (x >= x1) & (x < x2) & (y >= y1) & (y < y2) & region_mask.bool().unsqueeze(1)
    area = torch.where(inside, pos[..., 6].unsqueeze(1), torch.full_like(inside, 2.0, dtype=pos.dtype))
    target = area.argmin(dim=-1)
    return torch.where(grounded & inside.any(dim=-1), target, torch.full_like(target, -1))


def grounding_loss(module, batch: dict, settings: GroundingConfig, out=None, pos=None,
                   layer: int = GROUNDING_LAYER) -> tuple[torch.Tensor, float]:
    """(loss, share of annotated words whose predicted centre lands in their object's image token) of
    supervised grounding on the batch's matched pairs (``settings``: the config's grounding section): each
    annotated word's output token regresses its object's centre and, with an attention weight, its attention
    at ``layer`` (heads averaged) is pulled onto the image token holding that centre. ``out``: the pairs'
    transformer output when already computed (with that layer's logits when the attention term is on), and
    ``pos`` their image tokens' boxes [B, M, 7]."""
    if "word_grounded" not in batch:
        from pipeline.errors import UserError
        raise UserError("the grounding loss needs word->object annotations (word_objects and objects in the "
                        "shards' JSON); set pretrain.tasks.grounding / finetune.grounding_weight to 0")
    if out is None:
        tokens = module.encode_image(batch)
        layers = [layer] if settings.needs_attention else []
        out, pos = module(batch, image_tokens=tokens, attn_logit_layers=layers), tokens.pos
    grounded, centres = batch["word_grounded"], batch["word_centre"].float()
    n = grounded.shape[0]
    regions = out.region_mask[:n, out.text_len:]
    boxes = pos[:n, :regions.shape[1]].float()
    target = grounding_regions(boxes, regions, centres, grounded)
    hit = target >= 0
    predicted = module.grounding_predictions(out.sequence, grounded).float()
    logits = out.attn_logits[layer % module.config.num_layers][:n] if settings.needs_attention else None
    if not hit.any():   # no annotated word in this batch: a zero that keeps the graph
        zero = predicted.sum() * 0.0
        return (zero if logits is None else zero + logits.sum() * 0.0), 0.0
    error = predicted - centres[grounded]
    regression = error.abs().mean() if settings.regression == "l1" else error.pow(2).mean()
    loss = settings.regression_weight * regression
    if logits is not None:
        loss = loss + settings.attention_weight * attention_pull(logits, out, boxes.shape[1], target, hit)
    guessed = centres.clone()
    guessed[grounded] = predicted.detach()
    landed = grounding_regions(boxes, regions, guessed, grounded)
    return loss, (landed[hit] == target[hit]).float().mean().item()


def attention_pull(logits: torch.Tensor, out, regions: int, target: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """Mean -log attention (heads averaged) of each annotated word on the image token of its object."""
    n, t = target.shape
    probs = logits.float().masked_fill(~out.attn_mask[:n, None, None, :], float("-inf")).softmax(-1).mean(1)
    to_image = probs[:, :t, out.text_len:out.text_len + regions]                  # [B, T, M]
    return -torch.log(to_image[hit].gather(1, target[hit].unsqueeze(1)).clamp_min(1e-9)).mean()


def mask_regions(region_mask: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Bool [B, M] regions chosen for MRFR: each real region with probability ``prob``, at least one per row."""
    chosen = (torch.rand(region_mask.shape, generator=generator) < prob) & region_mask
    none = ~chosen.any(dim=1) & region_mask.any(dim=1)
    first = region_mask.float().argmax(dim=1)
    chosen[none, first[none]] = True
    return chosen


def mrfr_loss(module, batch: dict, prob: float, generator: torch.Generator) -> torch.Tensor:
    """UNITER's masked region feature regression: chosen regions' input features are replaced by the learned
    mask feature and their raw features regressed (MSE) from the output tokens."""
    tokens = module.encode_image(batch)
    chosen = mask_regions(tokens.mask.cpu().bool(), prob, generator).to(tokens.feat.device)
    out = module(batch, image_tokens=tokens, attn_logit_layers=[], masked_regions=chosen)
    predicted = module.mrfr_predictions(out, chosen)
    return F.mse_loss(predicted.float(), tokens.feat[chosen].detach().float())


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if not dist_utils.is_initialized() or dist_utils.world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_nn
    return torch.cat(dist_nn.all_gather(x), dim=0)


def _gather_plain(x: torch.Tensor) -> torch.Tensor:
    if not dist_utils.is_initialized() or dist_utils.world_size() == 1:
        return x
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(dist_utils.world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def itc_loss(module, batch: dict) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE of local queries against the embeddings of all ranks; other captions of the same
    image are not counted as negatives."""
    t = module.embed_text(batch)
    v = module.embed_image(batch)
    t_all, v_all = _gather_with_grad(t), _gather_with_grad(v)
    ids_all = _gather_plain(batch["image_id"])
    b, offset = t.shape[0], dist_utils.rank() * t.shape[0]
    target = torch.arange(b, device=t.device) + offset
    same = batch["image_id"].unsqueeze(1) == ids_all.unsqueeze(0)
    same[torch.arange(b), target] = False
    t2i = module.itc_logits(t, v_all).float().masked_fill(same, float("-inf"))
    i2t = module.itc_logits(v, t_all).float().masked_fill(same, float("-inf"))
    loss = (F.cross_entropy(t2i, target) + F.cross_entropy(i2t, target)) / 2
    acc = (t2i.argmax(dim=1) == target).float().mean().item()
    return loss, acc
