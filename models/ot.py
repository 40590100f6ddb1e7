"""UNITER's word-region alignment (WRA): optimal transport between word and region outputs, solved by IPOT.

IPOT is the inexact proximal point method of Xie et al. 2019 ("A Fast Proximal Point Method for Computing
Exact Wasserstein Distance"): each outer step is a Sinkhorn projection of exp(-C / beta) * T_prev, so the
plan converges to an exact OT plan rather than an entropy-blurred one. UNITER runs beta = 0.5, 50 outer
steps and k = 1 inner step, with cost 1 - cosine similarity and uniform marginals over each sample's real
words and regions; padded positions carry no mass.

Everything runs in at least float32 (float64 stays float64). Samples without any word or without any
region get a zero plan and distance 0, and ``wra_loss`` leaves them out.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

_NORM_EPS = 1e-5  # F.normalize eps, as UNITER's cost_matrix_cosine


def cosine_cost(words: Tensor, regions: Tensor) -> Tensor:
    """Cosine distance 1 - cos(w_i, r_j) between every word and region of each sample: [B,T,D], [B,M,D] -> [B,T,M]."""
    dtype = _compute_dtype(words)
    w = F.normalize(words.to(dtype), dim=-1, eps=_NORM_EPS)
    r = F.normalize(regions.to(dtype), dim=-1, eps=_NORM_EPS)
    return 1 - w @ r.transpose(1, 2)


@torch.no_grad()
def ipot_plan(cost: Tensor, word_mask: Tensor, region_mask: Tensor, beta: float = 0.5, iterations: int = 50,
              inner_steps: int = 1) -> Tensor:
    """IPOT transport plan [B,T,M] between uniform word and region marginals; no gradient, 0 on padding."""
    cost = cost.to(_compute_dtype(cost))
    valid = (word_mask.any(1) & region_mask.any(1))[:, None]
    words, regions = word_mask & valid, region_mask & valid
    joint = words[:, :, None] & regions[:, None, :]
    mu = _uniform(words, cost.dtype)
    nu = _uniform(regions, cost.dtype)
    # Zero marginals alone already exclude padding; the mask also keeps non-finite padded costs out. Bounded
    # costs (cosine: [0, 2]) keep exp(-C / beta) far from underflow for beta = 0.5.
    kernel = torch.where(joint, torch.exp(-cost / beta), 0)
    plan = joint.to(cost.dtype)
    a = mu
    for _ in range(iterations):
        q = kernel * plan
        for _ in range(inner_steps):
            # Regions first, then words (UNITER's order): the word marginals of the result are exact.
            b = _safe_div(nu, (q * a[:, :, None]).sum(1), regions)
            a = _safe_div(mu, (q * b[:, None, :]).sum(2), words)
        plan = a[:, :, None] * q * b[:, None, :]
    return plan


def wra_distance(words: Tensor, regions: Tensor, word_mask: Tensor, region_mask: Tensor, beta: float = 0.5,
                 iterations: int = 50, inner_steps: int = 1) -> Tensor:
    """Per-sample OT distance sum(T * C) [B] between words [B,T,D] and regions [B,M,D]; differentiable in C."""
    cost = cosine_cost(words, regions)
    joint = word_mask[:, :, None] & region_mask[:, None, :]
    cost = torch.where(joint, cost, 0)
    # As UNITER: the plan comes from the detached cost and is a constant of the distance, so gradients flow
    # through C only (for an optimal plan that is the gradient of the OT distance itself).
    plan = ipot_plan(cost.detach(), word_mask, region_mask, beta, iterations, inner_steps)
    return (cost * plan).sum((1, 2))


def wra_loss(sequence: Tensor, word_mask: Tensor, region_mask: Tensor, matched: Tensor, **ipot_kwargs) -> Tensor:
    """UNITER's WRA loss (sum of matched distances - sum of mismatched ones) / samples, over [text | image] outputs.

    ``sequence`` [B,N,H] transformer outputs; ``word_mask`` / ``region_mask`` bool [B,N] select the words
    (no [CLS]/[SEP]) and the regions; ``matched`` bool [B]. Samples without words or regions are left out of
    both sums and of the count (0 when none is left). One host sync (the word and region spans).
    """
    (w0, w1), (r0, r1) = _spans(word_mask, region_mask)
    dist = wra_distance(sequence[:, w0:w1], sequence[:, r0:r1], word_mask[:, w0:w1], region_mask[:, r0:r1],
                        **ipot_kwargs)
    valid = word_mask.any(1) & region_mask.any(1)
    signed = torch.where(matched.bool(), dist, -dist)
    return torch.where(valid, signed, 0).sum() / valid.sum().clamp_min(1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _uniform(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """1 / (real count) on the real positions of each row, 0 elsewhere."""
    m = mask.to(dtype)
    return m / m.sum(1, keepdim=True).clamp_min(1)


def _safe_div(num: Tensor, den: Tensor, mask: Tensor) -> Tensor:
    """num / den on real positions; padded ones (num = 0, den = 0) give 0 instead of NaN."""
    return num / (den + (~mask).to(den.dtype))


def _spans(*masks: Tensor) -> list[tuple[int, int]]:
    """[first, last + 1) of the positions real in some row, per [B,N] mask (empty when none); one host sync."""
    present = torch.stack([m.any(0) for m in masks])
    n = present.shape[1]
    pos = torch.arange(n, device=present.device)
    first = torch.where(present, pos, n).amin(1)
    end = torch.where(present, pos + 1, 0).amax(1)
    return [tuple(span) for span in torch.stack([first, end], 1).tolist()]
