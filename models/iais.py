"""IAIS regulariser and ISD metric on one layer's attention logits (DESIGN.md, "IAIS and ISD").

All functions take one layer's pre-softmax logits ``scores`` [B, H, N, N] and bool masks ``word_mask`` /
``region_mask`` [B, N] marking the words and the regions of each sample's sequence. Everything runs batched
in at least float32 whatever the input dtype (float64 stays float64).

Only the row/column spans that hold the batch's words and regions are touched ([first, last + 1) positions
over the batch; for the usual layout `[CLS] w.. [SEP] pad r.. pad` that is the word and region ranges): a
block attention is the head mean of a softmax of the view scores[:, :, rows, cols] with -inf added on the
columns that are not the group's in a sample (skipped when there are none), so those columns are exactly 0
and matrix products only sum over the right block. Rows that are not the group's are finite garbage with
weight 0 in the row mean: padding never changes a result and never makes a NaN. Singular alignment only needs
an argmax of the cross blocks, so they are computed without autograd. One host sync per call (the spans).

Samples without any word or without any region have no IAIS: their per-sample value is 0 and ``iais_loss``
averages over the other samples only (0 when there are none).

Plain logs are clamped at the smallest normal float, so 0 log 0 = 0 and an underflowed probability gives a
large finite term instead of inf. Singular alignment uses plain logs only; distributed and congruence use
the authors' KLDivLoss(log(x + 1e-6), target) in both directions (``_sym_kl_eps_rows``).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

ALIGNMENTS = ("singular", "distributed", "congruence")
SIDES = ("L", "V", "both")
_LOG_EPS = 1e-6
_WORDS, _REGIONS = 0, 1


def iais_loss(scores: Tensor, word_mask: Tensor, region_mask: Tensor, alignment: str = "singular",
              side: str = "L") -> Tensor:
    """Mean over samples (with >= 1 word and >= 1 region) of the per-sample IAIS mKL; differentiable."""
    per_sample, valid = _per_sample_mkl(scores, word_mask, region_mask, alignment, side)
    return per_sample.sum() / valid.sum().clamp_min(1)


def isd(scores: Tensor, word_mask: Tensor, region_mask: Tensor, alignment: str = "singular",
        side: str = "L") -> Tensor:
    """Per-sample ISD [B] (the IAIS mKL without gradients); 0 for samples without words or regions."""
    with torch.no_grad():
        return _per_sample_mkl(scores, word_mask, region_mask, alignment, side)[0]


def isd_annotated(scores: Tensor, word_mask: Tensor, region_mask: Tensor, word_to_region: Tensor) -> Tensor:
    """Per-sample ISDa [B]: consistency of the linguistic and the visual relations of annotated pairs.

    Not the paper's ISD (``isd``, which scores the model against its own alignment): here the alignment
    comes from annotations and no softmax is applied, so identical relations give exactly 0.
    ``word_to_region`` [B, N] long: sequence position of each word's annotated region, -1 if none.
    Definition (per sample):
      A    = annotated words: word positions i with word_to_region[i] = r(i) >= 0 and r(i) a region position
             (annotations pointing anywhere else, e.g. at a dropped region, count as unannotated);
      L[i, j] = S_LL[i, j] / sum_{k in A} S_LL[i, k]                    for i, j in A
      V[i, j] = S_VV[r(i), r(j)] / sum_{k in A} S_VV[r(i), r(k)]        for i, j in A
      ISDa = (1/|A|) sum_{i in A} KL(L_i || V_i) + KL(V_i || L_i)       (plain logs, 0 log 0 = 0)
    Words sharing a region give repeated rows/columns of V. S_LL and S_VV are the usual block attentions over
    all words / regions before restriction. Samples with no annotated word get 0 (exclude them with
    ``annotated_words(...).any(1)`` when averaging).
    """
    _check_inputs(scores, word_mask, region_mask)
    _check_word_to_region(word_to_region, word_mask, scores.shape[-1])
    ann = annotated_words(word_mask, region_mask, word_to_region)
    layout = _spans(word_mask, region_mask)
    if layout is None:
        return scores.new_zeros(scores.shape[0], dtype=_compute_dtype(scores))
    spans = layout[0]
    (w0, w1), (r0, r1) = spans
    with torch.no_grad():
        ann_w = ann[:, w0:w1]
        target = (word_to_region[:, w0:w1].long() - r0).clamp(0, r1 - r0 - 1)  # region-span coordinates
        dtype = _compute_dtype(scores)
        word_bias = _column_bias(word_mask[:, w0:w1], dtype)
        region_bias = _column_bias(region_mask[:, r0:r1], dtype)
        s_ll = _head_probs(scores, spans[_WORDS], spans[_WORDS], word_bias).mean(1)
        s_vv = _head_probs(scores, spans[_REGIONS], spans[_REGIONS], region_bias).mean(1)
        linguistic = _restrict(s_ll, ann_w)
        visual = _restrict(_gather_pairs(s_vv, target), ann_w)
        mkl = _row_mean(_sym_kl_rows(linguistic, visual), ann_w)
        return torch.where(ann.any(1), mkl, torch.zeros_like(mkl))


def grounding_hits(scores: Tensor, word_mask: Tensor, region_mask: Tensor, word_to_region: Tensor) -> Tensor:
    """Bool [B, N]: annotated words (``annotated_words``) whose S_LV row argmax is their annotated region.

    S_LV[i] is the head mean of the softmax of word i's logits over the sample's region columns; ties go to
    the first region. Grounding accuracy is ``hits.sum() / annotated_words(...).sum()``.
    """
    _check_inputs(scores, word_mask, region_mask)
    _check_word_to_region(word_to_region, word_mask, scores.shape[-1])
    ann = annotated_words(word_mask, region_mask, word_to_region)
    hits = torch.zeros_like(ann)
    layout = _spans(word_mask, region_mask)
    if layout is None:
        return hits
    (w0, w1), (r0, r1) = layout[0]
    with torch.no_grad():
        region_bias = _column_bias(region_mask[:, r0:r1], _compute_dtype(scores))
        s_lv = _head_probs(scores, (w0, w1), (r0, r1), region_bias).mean(1)
        hits[:, w0:w1] = (s_lv.argmax(-1) + r0 == word_to_region[:, w0:w1]) & ann[:, w0:w1]
    return hits


def _check_word_to_region(word_to_region: Tensor, word_mask: Tensor, n: int) -> None:
    if word_to_region.shape != word_mask.shape or word_to_region.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"word_to_region must be an integer tensor of shape {tuple(word_mask.shape)}, got "
                         f"{word_to_region.dtype} {tuple(word_to_region.shape)}")
    if bool(((word_to_region < -1) | (word_to_region >= n)).any()):
        raise ValueError(f"word_to_region values must be -1 or a sequence position in [0, {n})")


def _one_block(logits: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """mean_h softmax(A_h[rows, cols]) for one sample's logits [H, N, N] -> [len(rows), len(cols)]."""
    block = logits.float()[:, rows][:, :, cols]
    return torch.softmax(block, dim=-1).mean(0)


def attention_maps(logits: Tensor, words: Tensor, regions: Tensor, alignment: str) -> dict[str, Tensor]:
    """S_LL, S_VV and their pseudo counterparts P_L, P_V of ONE sample, for pictures.

    ``logits`` [H, N, N]; ``words`` / ``regions`` long position indices. A plain per-sample rendering of the
    DESIGN.md definitions (the batched losses above are what training and ISD use).
    """
    s_ll = _one_block(logits, words, words)
    s_vv = _one_block(logits, regions, regions)
    s_lv = _one_block(logits, words, regions)
    s_vl = _one_block(logits, regions, words)
    if alignment == "singular":
        a, b = s_lv.argmax(1), s_vl.argmax(1)
        p_l = torch.softmax(s_vv[a][:, a], dim=-1)
        p_v = torch.softmax(s_ll[b][:, b], dim=-1)
    elif alignment == "distributed":
        p_l, p_v = s_lv @ s_vl, s_vl @ s_lv
    else:
        p_l, p_v = s_lv @ s_vv @ s_vl, s_vl @ s_ll @ s_lv
    return {"S_LL": s_ll, "P_L": p_l, "S_VV": s_vv, "P_V": p_v}


def annotated_words(word_mask: Tensor, region_mask: Tensor, word_to_region: Tensor) -> Tensor:
    """Bool [B, N]: words whose annotation points at a region position (the set A of ``isd_annotated``)."""
    target = word_to_region.long().clamp_min(0)
    return word_mask & (word_to_region >= 0) & region_mask.gather(1, target)


def _per_sample_mkl(scores: Tensor, word_mask: Tensor, region_mask: Tensor, alignment: str,
                    side: str) -> tuple[Tensor, Tensor]:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    _check_inputs(scores, word_mask, region_mask)
    valid = word_mask.any(1) & region_mask.any(1)
    layout = _spans(word_mask, region_mask)
    if layout is None:
        return scores.new_zeros(scores.shape[0], dtype=_compute_dtype(scores)), valid
    spans, full = layout
    masks = (word_mask, region_mask)
    with_grad, argmax_only = _needed_blocks(alignment, side)
    dtype = _compute_dtype(scores)
    bias = [None if full[g] else _column_bias(masks[g][:, slice(*spans[g])], dtype)
            for g in (_WORDS, _REGIONS)]
    computed = _BlockAttention.apply(scores, tuple((spans[r], spans[c]) for r, c in with_grad),
                                     *(bias[c] for _, c in with_grad))
    blocks = dict(zip(with_grad, computed))
    with torch.no_grad():
        for rows, cols in argmax_only:
            blocks[rows, cols] = _head_probs(scores, spans[rows], spans[cols], bias[cols]).mean(1)
    owns = {"L": [_WORDS], "V": [_REGIONS], "both": [_WORDS, _REGIONS]}[side]
    total = sum(_side_mkl(blocks, masks, spans, alignment, own) for own in owns)
    return torch.where(valid, total, torch.zeros_like(total)), valid


def _needed_blocks(alignment: str, side: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(row group, column group) blocks the loss differentiates, and those only used for an argmax."""
    owns = {"L": [_WORDS], "V": [_REGIONS], "both": [_WORDS, _REGIONS]}[side]
    with_grad, argmax_only = set(), set()
    for own in owns:
        other = 1 - own
        with_grad.add((own, own))
        if alignment == "singular":
            with_grad.add((other, other))
            argmax_only.add((own, other))
        else:
            with_grad.update({(own, other), (other, own)})
            if alignment == "congruence":
                with_grad.add((other, other))
    return sorted(with_grad), sorted(argmax_only - with_grad)


class _BlockAttention(torch.autograd.Function):
    """Head-mean row softmaxes of several blocks of one logits tensor, with one gradient buffer.

    Forward: `_head_probs(...).mean(1)` per block. Autograd through slices would allocate and zero a
    full-size gradient per slice, which costs more than the softmaxes on CPU.
    """

    @staticmethod
    def forward(ctx, scores, spans, *biases):
        probs = [_head_probs(scores, rows, cols, bias) for (rows, cols), bias in zip(spans, biases)]
        ctx.save_for_backward(*probs)
        ctx.spans, ctx.scores_shape, ctx.scores_dtype = spans, scores.shape, scores.dtype
        ctx.set_materialize_grads(False)
        return tuple(p.mean(1) for p in probs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        grad, written = None, []
        for (rows, cols), p, g in zip(ctx.spans, ctx.saved_tensors, grads):
            if g is None:
                continue
            if grad is None:
                grad = torch.zeros(ctx.scores_shape, dtype=p.dtype, device=p.device)
            view = grad[:, :, rows[0]:rows[1], cols[0]:cols[1]]
            # blocks overlap only when the word and region spans interleave; otherwise write in place
            overlaps = any(_intersects(rows, r) and _intersects(cols, c) for r, c in written)
            dx = torch.mul(p, g.unsqueeze(1) / p.shape[1], out=None if overlaps else view)
            dx.addcmul_(p, dx.sum(-1, keepdim=True), value=-1)  # softmax backward: p * (g - sum(p * g))
            if overlaps:
                view += dx
            written.append((rows, cols))
        grad = None if grad is None else grad.to(ctx.scores_dtype)
        return (grad, None) + (None,) * len(grads)


def _intersects(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _side_mkl(blocks: dict[tuple[int, int], Tensor], masks: tuple[Tensor, Tensor], spans, alignment: str,
              own: int) -> Tensor:
    """Per-sample mKL(S_own, P_own); blocks are in span coordinates (cut to the groups' spans)."""
    other = 1 - own
    own_mask, other_mask = masks[own][:, slice(*spans[own])], masks[other][:, slice(*spans[other])]
    intra = blocks[own, own]
    if alignment == "singular":
        cross = blocks[own, other]
        off_group = (~_nonempty(other_mask))[:, None, :].to(cross.dtype)
        align = (cross - off_group).argmax(-1)  # an off-group column never wins, even after underflow
        pseudo = _gathered_softmax(blocks[other, other], align, own_mask)
        return _row_mean(_sym_kl_rows(intra, pseudo), own_mask)
    if alignment == "distributed":
        pseudo = blocks[own, other] @ blocks[other, own]  # L: S_LV @ S_VL; V: S_VL @ S_LV
    else:
        pseudo = blocks[own, other] @ blocks[other, other] @ blocks[other, own]  # L: S_LV @ S_VV @ S_VL
    return _row_mean(_sym_kl_eps_rows(intra, pseudo), own_mask)


def _gathered_softmax(square: Tensor, align: Tensor, cols: Tensor) -> Tensor:
    """P[i, j] = softmax over columns j in `cols` of square[align[i], align[j]] (the singular alignment)."""
    gathered = _gather_pairs(square, align)
    return torch.softmax(gathered + _column_bias(cols, square.dtype)[:, None, :], dim=-1)


def _gather_pairs(square: Tensor, align: Tensor) -> Tensor:
    """[B, k, k] square[b, align[b, i], align[b, j]] of a batch of squares [B, m, m] and indices [B, k]."""
    b, m = square.shape[0], square.shape[-1]
    flat_index = align[:, :, None] * m + align[:, None, :]
    return square.reshape(b, -1).gather(1, flat_index.reshape(b, -1)).view(b, *flat_index.shape[1:])


def _head_probs(scores: Tensor, rows: tuple[int, int], cols: tuple[int, int], bias: Tensor | None) -> Tensor:
    """[B, H, rows, cols] row softmax of one block in float32+; `bias` [B, cols] is 0 / -inf, None when every
    column of the span is the group's in every sample."""
    block = scores[:, :, rows[0]:rows[1], cols[0]:cols[1]]
    if bias is None:  # a contiguous copy first: softmax of the strided view is slower than copy + softmax
        return torch.softmax(block.to(_compute_dtype(scores)).contiguous(), dim=-1)
    return torch.softmax(block + bias[:, None, None, :], dim=-1)


def _spans(word_mask: Tensor, region_mask: Tensor) -> tuple[list[tuple[int, int]], list[bool]] | None:
    """Per group (words, regions): the [first, last + 1) positions over the whole batch, and whether every
    position of that span is the group's in every sample. None if a group is empty. One host sync."""
    masks = torch.stack([word_mask, region_mask])  # [2, B, N]
    present = masks.any(1).to(torch.uint8)  # [2, N]
    n = present.shape[1]
    first, last = present.argmax(1), n - 1 - present.flip(1).argmax(1)
    stats = torch.stack([first, last, present.amax(1).long(), masks.sum((1, 2))]).tolist()
    if not all(stats[2]):
        return None
    spans = [(f, lst + 1) for f, lst in zip(stats[0], stats[1])]
    full = [count == word_mask.shape[0] * (hi - lo) for count, (lo, hi) in zip(stats[3], spans)]
    return spans, full


def _compute_dtype(scores: Tensor) -> torch.dtype:
    return torch.promote_types(scores.dtype, torch.float32)


def _column_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 on the group's columns, -inf elsewhere; an empty group takes all columns (finite, masked later)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~_nonempty(mask), float("-inf"))


def _nonempty(mask: Tensor) -> Tensor:
    return mask | ~mask.any(1, keepdim=True)


def _restrict(block: Tensor, cols: Tensor) -> Tensor:
    kept = block * cols[:, None, :].to(block.dtype)
    return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny)


def _sym_kl_rows(p: Tensor, q: Tensor) -> Tensor:
    """KL(p_i || q_i) + KL(q_i || p_i) per row, plain logs: sum_j (p - q)(log p - log q); 0 if p = q = 0."""
    return ((p - q) * (_plain_log(p) - _plain_log(q))).sum(-1)


def _sym_kl_eps_rows(p: Tensor, q: Tensor) -> Tensor:
    """Per row sum_j p (log p - log(q + eps)) + q (log q - log(p + eps)): the authors'
    ``KLDivLoss(log(p + eps), q) + KLDivLoss(log(q + eps), p)``; the eps sits only inside the log of the
    distribution compared against."""
    return (p * (_plain_log(p) - _eps_log(q)) + q * (_plain_log(q) - _eps_log(p))).sum(-1)


def _row_mean(rows: Tensor, row_mask: Tensor) -> Tensor:
    weights = row_mask.to(rows.dtype)
    return (rows * weights).sum(-1) / weights.sum(-1).clamp_min(1)


def _plain_log(x: Tensor) -> Tensor:
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def _eps_log(x: Tensor) -> Tensor:
    return torch.log(x + _LOG_EPS)


def _check_inputs(scores: Tensor, word_mask: Tensor, region_mask: Tensor) -> None:
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be [B, H, N, N] attention logits, got shape {tuple(scores.shape)}")
    expected = (scores.shape[0], scores.shape[-1])
    for name, mask in (("word_mask", word_mask), ("region_mask", region_mask)):
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(f"{name} must be a bool tensor of shape {expected}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
