"""One retrieval fine-tuning step: hard negatives mined from the pool in both directions, margin rank loss,
IAIS on the positive pairs (DESIGN.md "Retrieval fine-tuning", "IAIS and ISD").

The loss of a step (README "Authors' recipe vs ours"):
    sum over the directions trained of mean_hinge(direction) + w * s(t) * sum over the sides used of IAIS(side)
with ``w = finetune.iais.weight``. Text-anchored groups (one text, hard images) pair with the language side,
image-anchored groups with the vision side. The authors' per-optimizer-step balance
``mean(rank_i2t) + mean(rank_t2i) + 8 s(t) (IAIS_V + IAIS_L)`` is therefore w = 8 (their train_batch_size).
"""
from __future__ import annotations

import torch

from models.iais import iais_loss
from pipeline.config import ExperimentConfig
from pipeline.train.build import to_device
from pipeline.train.negatives import (CandidatePool, index_tokens, margin_rank_loss, pad_cat, pad_value, score_grid,
                                      text_rows, iais_schedule, IMAGE_KEYS, TEXT_KEYS)
from pipeline.errors import UserError
from pipeline.train.objectives import GROUNDING_LAYER, grounding_loss, itc_loss


def _first_valid(valid: torch.Tensor, n: int) -> torch.Tensor:
    """Per row, the column indices of the first ``n`` True entries of ``valid`` [A, C]."""
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :n]
    if not bool(valid.gather(1, order).all()):
        raise UserError("the current micro-batch holds too few other images for the random-negative phase: "
                        "raise train.micro_batch_size or lower finetune.hard_size")
    return order


def cross_scored_per_anchor(itc_preselect: int, negative_size: int, hard_size: int) -> int:
    """Candidates per anchor the cross-encoder scores to choose the hard ones: none when an ITC shortlist
    (``itc_preselect``) is the kept set, since scoring it would only reorder it."""
    return 0 if itc_preselect and negative_size == hard_size else negative_size


def _anchor_rows(cols: torch.Tensor) -> torch.Tensor:
    """The anchor index of every entry of ``cols`` [A, n]."""
    return torch.arange(cols.shape[0]).unsqueeze(1).expand_as(cols)


class FinetuneStep:
    """Mining and loss assembly of one micro-step. ``module`` is the RetrievalModel; ``forward`` the callable
    that runs its trained forward (the DeepSpeed engine in training, the module itself in tests)."""

    def __init__(self, cfg: ExperimentConfig, module, pool: CandidatePool, device: torch.device,
                 total_steps: int, forward=None):
        self.cfg, self.module, self.pool, self.device, self.total = cfg, module, pool, device, total_steps
        self.forward = forward if forward is not None else module
        self.ft = cfg.finetune
        self.chunk = max(1, cfg.eval.score_batch)
        self.random_phase = False
        self.counts: dict[str, int] = {}

    def directions(self, step: int) -> tuple[bool, bool]:
        """(text-anchored groups, image-anchored groups) at ``step``."""
        d = self.ft.directions
        if d == "alternate":
            return step % 2 == 0, step % 2 == 1
        return d in ("both", "text"), d in ("both", "image")

    # ---- mining (no gradients) -------------------------------------------------------------------
    @torch.no_grad()
    def mine(self, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool rows of the hard images per anchor text and hard texts per anchor image, each [B, k]."""
        module, b = self.module, batch["input_ids"].shape[0]
        text_anchored, image_anchored = self.directions(step)
        self.random_phase = step < self.ft.hard_start_step
        self.counts = {"pairs_scored": 0, "images_encoded": 0}
        anchor_ids = batch["image_id"].cpu()
        image_generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
        hard_img = hard_txt = torch.zeros(b, 0, dtype=torch.long)
        was_training = module.training
        module.eval()
        try:
            if text_anchored:
                texts = {k: batch[k] for k in TEXT_KEYS if k in batch}
                hard_img = (self._random_in_batch(anchor_ids, b, generator) if self.random_phase
                            else self._hard_images(texts, anchor_ids, generator))
            if image_anchored:
                images = {k: batch[k] for k in IMAGE_KEYS if k in batch}
                hard_txt = (self._random_in_batch(anchor_ids, b, image_generator) if self.random_phase
                            else self._hard_texts(images, anchor_ids, image_generator))
        finally:
            module.train(was_training)
        return hard_img, hard_txt

    def _draw(self, anchor_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh random candidates per anchor: the distinct pool rows drawn and, per anchor, [A, n] indices
        into them (each distinct row is encoded once however many anchors drew it)."""
        rows = self.pool.draw_per_anchor(anchor_ids, self.ft.itc_preselect or self.ft.negative_size, generator)
        unique, cols = torch.unique(rows, return_inverse=True)
        return unique, cols

    def _shortlist(self, sim_fn, cols: torch.Tensor) -> torch.Tensor:
        """With finetune.itc_preselect: per anchor the negative_size drawn candidates most similar by ITC."""
        if not self.ft.itc_preselect:
            return cols
        sim = sim_fn().float().cpu()   # [A, unique]
        return cols.gather(1, sim.gather(1, cols).topk(self.ft.negative_size, dim=1).indices)

    def _keep_hardest(self, score_fn, unique: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Pool rows of each anchor's hard_size candidates that ``score_fn(cols)`` [A, n] scores highest; a
        shortlist that is kept whole is not scored."""
        ft = self.ft
        if cross_scored_per_anchor(ft.itc_preselect, ft.negative_size, ft.hard_size) == 0:
            return unique[cols]
        scores = score_fn(cols)
        self.counts["pairs_scored"] += scores.numel()
        return unique[cols.gather(1, scores.topk(self.ft.hard_size, dim=1).indices.cpu())]

    def _hard_images(self, texts: dict, anchor_ids: torch.Tensor, generator) -> torch.Tensor:
        module = self.module
        unique, cols = self._draw(anchor_ids, generator)
        tokens = module.encode_image(to_device(self.pool.images(unique), self.device))
        self.counts["images_encoded"] += len(unique)
        cols = self._shortlist(lambda: module.embed_text(texts) @ module.embed_image({}, image_tokens=tokens).T,
                               cols)
        return self._keep_hardest(lambda c: score_grid(module.score, texts, tokens, _anchor_rows(c), c, self.chunk),
                                  unique, cols)

    def _hard_texts(self, images: dict, anchor_ids: torch.Tensor, generator) -> torch.Tensor:
        module = self.module
        unique, cols = self._draw(anchor_ids, generator)
        cand_texts = to_device(self.pool.texts(unique), self.device)
        tokens = module.encode_image(images)
        self.counts["images_encoded"] += cols.shape[0]
        cols = self._shortlist(lambda: module.embed_image({}, image_tokens=tokens) @ module.embed_text(cand_texts).T,
                               cols)
        return self._keep_hardest(lambda c: score_grid(module.score, cand_texts, tokens, c, _anchor_rows(c),
                                                       self.chunk), unique, cols)

    def _random_in_batch(self, anchor_ids: torch.Tensor, b: int, generator) -> torch.Tensor:
        """Random-phase negatives: the current batch (the pool's newest rows) rolled by random shifts, so
        every image/text of the batch is a negative as often as it is a positive and features of one side
        alone cancel out of the gradient (pool negatives from other batches do not: the model then drifts
        to the all-scores-low collapse before it finds the interaction)."""
        shifts = 1 + torch.randperm(max(b - 1, 1), generator=generator)
        rows = (len(self.pool) - b) + (torch.arange(b).unsqueeze(1) + shifts.unsqueeze(0)) % b   # [b, b-1]
        valid = anchor_ids.unsqueeze(1) != self.pool.image_ids()[rows]
        return rows.gather(1, _first_valid(valid, self.ft.hard_size))

    # ---- the trained forward ---------------------------------------------------------------------
    def iais_side(self, step: int) -> str:
        side = self.ft.iais.side
        if side == "alternate":   # the reference: text-anchored groups use L, image-anchored groups V
            text_anchored, image_anchored = self.directions(step)
            if text_anchored and image_anchored:
                return "both"
            return "L" if text_anchored else "V"
        return side

    def groups(self, batch: dict, hard_img: torch.Tensor, hard_txt: torch.Tensor) -> tuple[dict, object]:
        """The trained pairs, positives first: (texts of every pair, image tokens of every pair)."""
        b, n_img, n_txt = batch["input_ids"].shape[0], hard_img.shape[1], hard_txt.shape[1]
        images = {key: pad_cat([batch[key].cpu(), v]) for key, v in
                  self.pool.images(hard_img.reshape(-1)).items()} if n_img else \
            {key: batch[key] for key in IMAGE_KEYS if key in batch}
        texts = {key: pad_cat([batch[key].cpu(), v], pad_value(key))
                 for key, v in self.pool.texts(hard_txt.reshape(-1)).items()} if n_txt else \
            {key: batch[key] for key in TEXT_KEYS if key in batch}
        images, texts = to_device(images, self.device), to_device(texts, self.device)
        ar = torch.arange(b)
        text_idx = torch.cat([ar, ar.repeat_interleave(n_img), b + torch.arange(b * n_txt)])
        image_idx = torch.cat([ar, b + torch.arange(b * n_img), ar.repeat_interleave(n_txt)])
        self.counts["images_encoded"] += b + b * n_img
        tokens = index_tokens(self.module.encode_image(images), image_idx.to(self.device))
        return text_rows(texts, text_idx.to(self.device)), tokens

    def __call__(self, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        ft, module = self.ft, self.module
        b = batch["input_ids"].shape[0]
        hard_img, hard_txt = self.mine(batch, step, generator)
        n_img, n_txt = hard_img.shape[1], hard_txt.shape[1]
        pairs, tokens = self.groups(batch, hard_img, hard_txt)
        swapped = self._swap_rows(batch)
        if len(swapped):
            pairs, tokens = self._with_swaps(batch, pairs, tokens, swapped)
        use_iais = ft.iais.alignment != "none" and ft.iais.weight > 0
        layers = list(ft.iais.layers) if use_iais else []
        grounding_attention = ft.grounding_weight > 0 and self.cfg.grounding.needs_attention
        logit_layers = layers + ([GROUNDING_LAYER] if grounding_attention else [])
        out = self.forward(pairs, image_tokens=tokens, attn_logit_layers=logit_layers)
        logits = module.rank_head(out.pooled).squeeze(-1).float()
        scalars = {"pos_score": torch.sigmoid(logits[:b]).mean().item(), "score_std": logits.detach().std().item(),
                   "pairs_trained": float(logits.numel()), **{k: float(v) for k, v in self.counts.items()}}
        rank_loss = self._rank_loss(logits, b, n_img, n_txt, scalars)
        if len(swapped):
            swap_loss = margin_rank_loss(logits[:b][swapped], logits[-len(swapped):].unsqueeze(1), ft.margin)
            rank_loss = rank_loss + swap_loss
            scalars["rank_loss_swap"] = swap_loss.item()
        loss = rank_loss
        if ft.grounding_weight > 0:
            positives = {k: batch[k] for k in ("word_grounded", "word_centre") if k in batch}
            ground, scalars["centre_acc"] = grounding_loss(module, positives, self.cfg.grounding, _rows(out, b),
                                                           tokens.pos[:b], GROUNDING_LAYER)
            loss = loss + ft.grounding_weight * ground
            scalars["grounding_loss"] = ground.item()
        weight = ft.iais.weight * iais_schedule(ft.iais.schedule, step, self.total) if use_iais else 0.0
        scalars["iais_loss"] = 0.0
        if use_iais:
            num_layers = module.config.num_layers
            side = self.iais_side(step)
            terms = [iais_loss(out.attn_logits[layer % num_layers][:b], out.word_mask[:b], out.region_mask[:b],
                               alignment=ft.iais.alignment, side=side) for layer in layers]
            ia = torch.stack(terms).mean()
            loss = loss + weight * ia
            scalars["iais_loss"] = ia.item()
        if ft.itc_weight > 0:
            itc, scalars["itc_acc"] = itc_loss(module, batch)
            loss = loss + ft.itc_weight * itc
            scalars["itc_loss"] = itc.item()
        scalars.update(loss=loss.item(), rank_loss=rank_loss.item(), iais_weight=weight)
        return loss, scalars

    def _swap_rows(self, batch: dict) -> torch.Tensor:
        """Anchors whose swapped caption joins the step as a hard negative of their image."""
        if not self.ft.swap_negatives or "has_swap" not in batch:
            return torch.zeros(0, dtype=torch.long)
        return torch.nonzero(batch["has_swap"].cpu()).flatten()

    def _with_swaps(self, batch: dict, pairs: dict, tokens, rows: torch.Tensor) -> tuple[dict, object]:
        """The trained pairs + (swapped caption, own image) of ``rows``, appended last."""
        swaps = {"input_ids": batch["swap_input_ids"].cpu()[rows], "text_mask": batch["swap_text_mask"].cpu()[rows]}
        swaps = to_device(swaps, self.device)
        extended = {k: pad_cat([pairs[k], swaps[k]], pad_value(k)) for k in swaps}
        extended.update({k: pad_cat([v, torch.full((len(rows),) + v.shape[1:], pad_value(k), dtype=v.dtype,
                                                   device=v.device)], pad_value(k))
                         for k, v in pairs.items() if k not in swaps})
        index = torch.cat([torch.arange(tokens.mask.shape[0]), rows]).to(self.device)
        return extended, index_tokens(tokens, index)

    def _rank_loss(self, logits: torch.Tensor, b: int, n_img: int, n_txt: int, scalars: dict) -> torch.Tensor:
        """Sum over the directions trained of the mean hinge of their groups (+ the optional BCE term)."""
        ft, pos = self.ft, logits[:b]
        terms = []
        for name, start, k in (("t2i", b, n_img), ("i2t", b + b * n_img, n_txt)):
            if not k:
                continue
            neg = logits[start:start + b * k].view(b, k)
            terms.append(margin_rank_loss(pos, neg, ft.margin))
            scalars[f"rank_loss_{name}"] = terms[-1].item()
            scalars["hard_image_score" if name == "t2i" else "hard_text_score"] = torch.sigmoid(neg).mean().item()
        rank_loss = torch.stack(terms).sum()
        if ft.bce_weight > 0:
            labels = torch.zeros_like(logits)
            labels[:b] = 1.0
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            rank_loss = rank_loss + ft.bce_weight * bce
            scalars["bce_loss"] = bce.item()
        return rank_loss


def _rows(out, n: int):
    """The first ``n`` pairs of a transformer output (the positives), as the grounding loss reads them."""
    from dataclasses import replace
    return replace(out, sequence=out.sequence[:n], attn_mask=out.attn_mask[:n], region_mask=out.region_mask[:n],
                   attn_logits={k: v[:n] for k, v in out.attn_logits.items()})
