"""ISD (the paper's metric, what IAIS minimises) and ISDa / grounding accuracy against annotations, on
matched pairs, sharded across ranks like retrieval."""
from __future__ import annotations


import torch

from models import iais
from models.image_encoder import ImageTokens
from pipeline.config import EvalConfig
from pipeline.evaluation.retrieval import device_of, images_for, sharded_map
from pipeline.data.eval_split import EvalData


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
    device = device_of(model)
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
