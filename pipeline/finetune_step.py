"""One retrieval fine-tuning step: hard negatives mined from the pool in both directions, margin rank loss,
IAIS on the positive pairs (DESIGN.md "Retrieval fine-tuning", "IAIS and ISD")."""
from __future__ import annotations

import torch

from models.iais import iais_loss
from pipeline.config import ExperimentConfig
from pipeline.negatives import (CandidatePool, candidate_valid, hardest, index_tokens, margin_rank_loss,
                                pad_cat, preselect_by_similarity, score_grid, text_rows, iais_schedule,
                                IMAGE_KEYS, TEXT_KEYS)
from pipeline.errors import UserError
from pipeline.pretrain_tasks import itc_loss


def _require_valid(valid: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    if not bool(valid.gather(1, cols).all()):
        raise UserError("the hard-negative pool holds too few candidates with another image id: raise "
                        "finetune.pool_size or lower finetune.negative_size")
    return cols


def _first_valid(valid: torch.Tensor, n: int) -> torch.Tensor:
    """Per row, the column indices of the first ``n`` True entries of ``valid`` [A, C]."""
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    return _require_valid(valid, order[:, :n])


def _to(d: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in d.items()}


class FinetuneStep:
    def __init__(self, cfg: ExperimentConfig, engine, pool: CandidatePool, device: torch.device, total_steps: int):
        self.cfg, self.engine, self.pool, self.device, self.total = cfg, engine, pool, device, total_steps
        self.ft = cfg.finetune
        self.chunk = max(1, cfg.eval.score_batch)
        self.random_phase = False

    @property
    def module(self):
        return self.engine.module

    # ---- mining (no gradients) -------------------------------------------------------------------
    def _in_batch_rows(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """Random-phase candidates: the current batch (the pool's newest rows) rolled by random shifts, so
        every image/text of the batch is a negative as often as it is a positive and features of one side
        alone cancel out of the gradient (pool negatives from other batches do not: the model then drifts
        to the all-scores-low collapse before it finds the interaction)."""
        shifts = 1 + torch.randperm(max(b - 1, 1), generator=generator)
        return (len(self.pool) - b) + (torch.arange(b).unsqueeze(1) + shifts.unsqueeze(0)) % b   # [b, b-1]

    def _candidate_columns(self, anchor_ids, cand_ids, sim_fn, generator) -> torch.Tensor:
        valid = candidate_valid(anchor_ids, cand_ids)
        if self.random_phase:
            return _first_valid(valid, self.ft.hard_size)
        if self.ft.itc_preselect:
            return _require_valid(valid, preselect_by_similarity(sim_fn(), valid, self.ft.negative_size))
        return _first_valid(valid, self.ft.negative_size)

    def directions(self, step: int) -> tuple[bool, bool]:
        """(text-anchored groups, image-anchored groups) at ``step``."""
        d = self.ft.directions
        if d == "alternate":
            return step % 2 == 0, step % 2 == 1
        return d in ("both", "text"), d in ("both", "image")

    @torch.no_grad()
    def mine(self, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool rows of the hard images per anchor text and hard texts per anchor image, each [B, k]."""
        module, ft, b = self.module, self.ft, batch["input_ids"].shape[0]
        text_anchored, image_anchored = self.directions(step)
        self.random_phase = step < ft.hard_start_step
        n_sample = (ft.itc_preselect or ft.negative_size) + b
        ids = self.pool.image_ids()
        anchor_ids = batch["image_id"].cpu()
        was_training = module.training
        module.eval()
        try:
            texts = {k: batch[k] for k in TEXT_KEYS if k in batch}
            anchor_images = {k: batch[k] for k in IMAGE_KEYS if k in batch}
            hard_img = hard_txt = torch.zeros(b, 0, dtype=torch.long)
            if text_anchored and self.random_phase:
                hard_img = self._random_in_batch(anchor_ids, ids, b, generator)
            elif text_anchored:
                rows = self.pool.sample(n_sample, generator)
                cand = _to(self.pool.images(rows), self.device)
                tokens = module.encode_image(cand)
                cols = self._candidate_columns(
                    anchor_ids, ids[rows],
                    lambda: module.embed_text(texts) @ module.embed_image({}, image_tokens=tokens).T, generator)
                hard_img = rows[self._hardest(cols, lambda c: score_grid(
                    module.score, texts, tokens, torch.arange(b).unsqueeze(1).expand_as(c), c, self.chunk))]
            if image_anchored and self.random_phase:
                hard_txt = self._random_in_batch(anchor_ids, ids, b, generator)
            elif image_anchored:
                rows = self.pool.sample(n_sample, torch.Generator().manual_seed(int(torch.randint(
                    2 ** 62, (1,), generator=generator))))
                cand_t = _to(self.pool.texts(rows), self.device)
                tokens = module.encode_image(anchor_images)
                cols = self._candidate_columns(
                    anchor_ids, ids[rows],
                    lambda: module.embed_image({}, image_tokens=tokens) @ module.embed_text(cand_t).T, generator)
                hard_txt = rows[self._hardest(cols, lambda c: score_grid(
                    module.score, cand_t, tokens, c, torch.arange(b).unsqueeze(1).expand_as(c), self.chunk))]
        finally:
            module.train(was_training)
        return hard_img, hard_txt

    def _random_in_batch(self, anchor_ids, ids, b: int, generator) -> torch.Tensor:
        rows = self._in_batch_rows(b, generator)
        valid = anchor_ids.unsqueeze(1) != ids[rows]
        return rows.gather(1, _first_valid(valid, self.ft.hard_size))

    def _hardest(self, cols: torch.Tensor, score_fn) -> torch.Tensor:
        """The hard_size highest-scoring of the candidate columns (random phase: the columns as drawn)."""
        if self.random_phase:
            return cols
        s = score_fn(cols)
        return cols.gather(1, hardest(s, torch.ones_like(s, dtype=torch.bool), self.ft.hard_size))

    # ---- the trained forward ---------------------------------------------------------------------
    def iais_side(self, step: int) -> str:
        side = self.ft.iais.side
        if side == "alternate":   # the reference: text-anchored batches use L, image-anchored batches V
            text_anchored, image_anchored = self.directions(step)
            if text_anchored and image_anchored:
                return "both"
            return "L" if text_anchored else "V"
        return side

    def __call__(self, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        ft, module = self.ft, self.module
        b = batch["input_ids"].shape[0]
        hard_img, hard_txt = self.mine(batch, step, generator)
        n_img, n_txt = hard_img.shape[1], hard_txt.shape[1]
        images = {key: pad_cat([batch[key].cpu(), v]) for key, v in
                  self.pool.images(hard_img.reshape(-1)).items()} if n_img else \
            {key: batch[key] for key in IMAGE_KEYS if key in batch}
        texts = {key: pad_cat([batch[key].cpu(), v], -1 if key in ("word_index", "word_to_region") else 0)
                 for key, v in self.pool.texts(hard_txt.reshape(-1)).items()} if n_txt else \
            {key: batch[key] for key in TEXT_KEYS if key in batch}
        images, texts = _to(images, self.device), _to(texts, self.device)
        ar = torch.arange(b)
        text_idx = torch.cat([ar, ar.repeat_interleave(n_img), b + torch.arange(b * n_txt)])
        image_idx = torch.cat([ar, b + torch.arange(b * n_img), ar.repeat_interleave(n_txt)])
        tokens = index_tokens(module.encode_image(images), image_idx.to(self.device))
        pairs = text_rows(texts, text_idx.to(self.device))
        use_iais = ft.iais.alignment != "none" and ft.iais.weight > 0
        layers = list(ft.iais.layers) if use_iais else []
        out = self.engine(pairs, image_tokens=tokens, attn_logit_layers=layers)
        logits = module.rank_head(out.pooled).squeeze(-1).float()
        pos = logits[:b]
        losses = []
        scalars = {"pos_score": torch.sigmoid(pos).mean().item(), "score_std": logits.detach().std().item()}
        if n_img:
            neg = logits[b:b + b * n_img].view(b, n_img)
            losses.append(margin_rank_loss(pos, neg, ft.margin))
            scalars["rank_loss_t2i"] = losses[-1].item()
            scalars["hard_image_score"] = torch.sigmoid(neg).mean().item()
        if n_txt:
            neg = logits[b + b * n_img:].view(b, n_txt)
            losses.append(margin_rank_loss(pos, neg, ft.margin))
            scalars["rank_loss_i2t"] = losses[-1].item()
            scalars["hard_text_score"] = torch.sigmoid(neg).mean().item()
        rank_loss = torch.stack(losses).mean()
        if ft.bce_weight > 0:
            labels = torch.zeros_like(logits)
            labels[:b] = 1.0
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            rank_loss = rank_loss + ft.bce_weight * bce
            scalars["bce_loss"] = bce.item()
        weight = ft.iais.weight * iais_schedule(ft.iais.schedule, step, self.total) if use_iais else 0.0
        loss = rank_loss
        if use_iais:
            num_layers = module.config.num_layers
            side = self.iais_side(step)
            terms = [iais_loss(out.attn_logits[layer % num_layers][:b], out.word_mask[:b], out.region_mask[:b],
                               alignment=ft.iais.alignment, side=side) for layer in layers]
            ia = torch.stack(terms).mean()
            loss = rank_loss + weight * ia
            scalars["iais_loss"] = ia.item()
        else:
            scalars["iais_loss"] = 0.0
        if ft.itc_weight > 0:
            itc, scalars["itc_acc"] = itc_loss(module, batch)
            loss = loss + ft.itc_weight * itc
            scalars["itc_loss"] = itc.item()
        scalars.update(loss=loss.item(), rank_loss=rank_loss.item(), iais_weight=weight)
        return loss, scalars
