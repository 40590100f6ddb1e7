"""The fine-tuning step in-process (no DeepSpeed): per-anchor candidate draws, mining, and the loss balance
against the authors' formula (lancopku/IAIS train_itm_hard_negatives.py)."""
from __future__ import annotations

import collections
import math
from pathlib import Path

import pytest
import torch

import models
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.train.finetune_step import FinetuneStep
from pipeline.train.negatives import (IMAGE_KEYS, TEXT_KEYS, CandidatePool, PoolWidths, iais_schedule, pad_cat,
                                      pool_bytes)

REPO = Path(__file__).resolve().parent.parent

REGIONS, FEAT, VOCAB = 5, 16, 40


def make_batch(gen: torch.Generator, b: int, first_id: int) -> dict:
    lengths = torch.randint(5, 9, (b,), generator=gen)
    width = int(lengths.max())
    ids = torch.randint(5, VOCAB, (b, width), generator=gen)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    ids[:, 0] = 2
    ids[torch.arange(b), lengths - 1] = 3
    ids = ids.masked_fill(~mask, 0)
    n_regions = torch.randint(3, REGIONS + 1, (b,), generator=gen)
    region_mask = torch.arange(REGIONS).unsqueeze(0) < n_regions.unsqueeze(1)
    return {"input_ids": ids, "text_mask": mask, "region_feat": torch.randn(b, REGIONS, FEAT, generator=gen),
            "region_pos": torch.rand(b, REGIONS, 7, generator=gen), "region_mask": region_mask,
            "image_id": torch.arange(first_id, first_id + b)}


def tiny_model() -> models.RetrievalModel:
    torch.manual_seed(0)
    return models.create_model("tiny", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                               intermediate_size=64, itc_dim=16, dropout=0.0, init_std=0.1,
                               image=dict(mode="features", feat_dim=FEAT, backbone=None))


def make_step(overrides: list[str], b: int = 8, pool_batches: int = 6, total: int = 100):
    cfg = load_config(None, ["data.synthetic={}", f"train.micro_batch_size={b}", *overrides])
    gen = torch.Generator().manual_seed(1)
    pool = CandidatePool(pool_batches)
    batches = [make_batch(gen, b, 100 * i) for i in range(pool_batches)]
    for batch in batches:
        pool.add(batch)
    model = tiny_model()
    return FinetuneStep(cfg, model, pool, torch.device("cpu"), total), batches[-1], model


def test_candidates_are_drawn_per_anchor_without_the_anchor_image():
    pool = CandidatePool(4)
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        pool.add(make_batch(gen, 8, 10 * i))
    anchors = torch.tensor([0, 1, 2, 30])
    rows = pool.draw_per_anchor(anchors, 20, torch.Generator().manual_seed(3))
    ids = pool.image_ids()
    assert rows.shape == (4, 20)
    assert all(len(set(r.tolist())) == 20 for r in rows)                 # distinct within an anchor
    assert not bool((ids[rows] == anchors.unsqueeze(1)).any())           # never the anchor's own image
    assert len({tuple(sorted(r.tolist())) for r in rows}) == 4           # each anchor its own draw
    with pytest.raises(UserError, match="negative_size"):
        pool.draw_per_anchor(anchors, 32, torch.Generator().manual_seed(3))


def test_mining_keeps_the_highest_scoring_of_each_anchors_own_candidates():
    step, batch, model = make_step(["finetune.negative_size=10", "finetune.hard_size=3",
                                    "finetune.directions=both"])
    hard_img, hard_txt = step.mine(batch, 0, torch.Generator().manual_seed(5))
    assert hard_img.shape == hard_txt.shape == (8, 3)
    # replay the draws (same generator sequence as mine) and score every candidate by hand
    gen = torch.Generator().manual_seed(5)
    image_gen = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
    drawn = step.pool.draw_per_anchor(batch["image_id"], 10, gen)
    model.eval()
    with torch.no_grad():
        for a in range(8):
            text = {k: batch[k][a:a + 1] for k in ("input_ids", "text_mask")}
            cand = step.pool.images(drawn[a])
            scores = model.score({k: v for k, v in text.items()}, model.encode_image(cand))
            expect = drawn[a][scores.topk(3).indices]
            assert sorted(hard_img[a].tolist()) == sorted(expect.tolist())
    drawn_t = step.pool.draw_per_anchor(batch["image_id"], 10, image_gen)
    assert all(set(hard_txt[a].tolist()) <= set(drawn_t[a].tolist()) for a in range(8))
    assert step.counts["pairs_scored"] == 2 * 8 * 10


def test_an_itc_shortlist_kept_whole_is_not_cross_scored():
    """itc_preselect with negative_size == hard_size: the hard negatives are the ITC top-k of each anchor's
    draw, and no pair is cross-encoded to choose among candidates that are all kept anyway."""
    step, batch, model = make_step(["finetune.itc_preselect=20", "finetune.negative_size=4",
                                    "finetune.hard_size=4", "finetune.directions=text", "finetune.itc_weight=0.5"])
    hard_img, _ = step.mine(batch, 0, torch.Generator().manual_seed(5))
    assert step.counts["pairs_scored"] == 0
    gen = torch.Generator().manual_seed(5)
    torch.randint(2 ** 62, (1,), generator=gen)   # mine() seeds its image-anchored generator first
    drawn = step.pool.draw_per_anchor(batch["image_id"], 20, gen)
    model.eval()
    with torch.no_grad():
        texts = {k: batch[k] for k in ("input_ids", "text_mask")}
        for a in range(8):
            sim = model.embed_text({k: v[a:a + 1] for k, v in texts.items()}) @ model.embed_image(
                step.pool.images(drawn[a])).T
            assert sorted(hard_img[a].tolist()) == sorted(drawn[a][sim[0].topk(4).indices].tolist())


def _reference_iais(logits: torch.Tensor, words: torch.Tensor, regions: torch.Tensor, side: str) -> torch.Tensor:
    """The authors' iais_singular on one sample's [H, N, N] logits, KLDivLoss(batchmean)."""
    kl = torch.nn.KLDivLoss(reduction="batchmean")

    def block(rows, cols):
        return torch.softmax(logits[:, rows][:, :, cols], dim=-1).mean(0)

    txt, img = block(words, words), block(regions, regions)
    if side == "L":
        index = block(words, regions).argmax(-1)
        pseudo = torch.softmax(img[index][:, index], dim=-1)
        return kl(txt.log(), pseudo) + kl(pseudo.log(), txt)
    index = block(regions, words).argmax(-1)
    pseudo = torch.softmax(txt[index][:, index], dim=-1)
    return kl(img.log(), pseudo) + kl(pseudo.log(), img)


def _authors_loss(model, step: FinetuneStep, batch: dict, hard_img, hard_txt, s_t: float) -> torch.Tensor:
    """Per anchor: rank.mean() / train_batch_size + s(t) * IAIS(positive pair), text-anchored with L,
    image-anchored with V, summed over the anchors (their gradient accumulation), train_batch_size = 8."""
    b, total = batch["input_ids"].shape[0], torch.zeros(())
    for a in range(b):
        for side, hard in (("L", hard_img[a]), ("V", hard_txt[a])):
            if side == "L":
                text = {k: batch[k][a:a + 1].expand(1 + len(hard), -1) for k in ("input_ids", "text_mask")}
                images = {k: torch.cat([batch[k][a:a + 1], step.pool.images(hard)[k]])
                          for k in ("region_feat", "region_pos", "region_mask")}
            else:
                cand = step.pool.texts(hard)
                width = max(batch["input_ids"].shape[1], cand["input_ids"].shape[1])
                text = {k: torch.cat([torch.nn.functional.pad(batch[k][a:a + 1], (0, width - batch[k].shape[1])),
                                      torch.nn.functional.pad(cand[k], (0, width - cand[k].shape[1]))])
                        for k in ("input_ids", "text_mask")}
                images = {k: batch[k][a:a + 1].expand(1 + len(hard), *batch[k].shape[1:])
                          for k in ("region_feat", "region_pos", "region_mask")}
            out = model({**text, **images}, attn_logit_layers=[-1])
            scores = torch.sigmoid(model.rank_head(out.pooled).squeeze(-1))
            rank = torch.relu(0.2 + scores[1:] - scores[0])
            words, regions = out.word_mask[0].nonzero().flatten(), out.region_mask[0].nonzero().flatten()
            iais = _reference_iais(out.attn_logits[model.config.num_layers - 1][0], words, regions, side)
            total = total + rank.mean() / 8 + s_t * iais
    return total


def _grads(model, loss) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters()])


def test_loss_balance_equals_the_authors_formula_at_weight_8():
    """Paper configs: both directions every step, sides following them, weight 8, exp schedule. On one batch
    of 8 anchors, the rank part and the IAIS part of the gradient equal those of the authors' loss."""
    step_no = 60
    sets = ["finetune.negative_size=6", "finetune.hard_size=2", "finetune.directions=both",
            "finetune.iais.side=alternate", "finetune.iais.alignment=singular", "finetune.iais.schedule=exp"]
    step, batch, model = make_step(sets + ["finetune.iais.weight=8.0"])
    loss, scalars = step(batch, step_no, torch.Generator().manual_seed(9))
    ours_total = _grads(model, loss)
    rank_step = make_step(sets + ["finetune.iais.weight=0.0"])[0]
    rank_step.module = rank_step.forward = model
    ours_rank = _grads(model, rank_step(batch, step_no, torch.Generator().manual_seed(9))[0])
    hard_img, hard_txt = step.mine(batch, step_no, torch.Generator().manual_seed(9))
    s_t = iais_schedule("exp", step_no, 100)
    assert math.isclose(scalars["iais_weight"], 8 * s_t)
    ref_total = _grads(model, _authors_loss(model, step, batch, hard_img, hard_txt, s_t))
    ref_rank = _grads(model, _authors_loss(model, step, batch, hard_img, hard_txt, 0.0))
    assert ours_rank.norm() > 0 and (ref_total - ref_rank).norm() > 0.05 * ref_rank.norm()
    torch.testing.assert_close(ours_rank, ref_rank, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_total - ours_rank, ref_total - ref_rank, rtol=1e-3, atol=1e-6)


def test_step_reports_the_shapes_it_ran():
    step, batch, _ = make_step(["finetune.negative_size=6", "finetune.hard_size=2", "finetune.directions=both"])
    _, scalars = step(batch, 5, torch.Generator().manual_seed(2))
    assert scalars["pairs_scored"] == 2 * 8 * 6
    assert scalars["pairs_trained"] == 8 + 2 * 8 * 2
    assert scalars["rank_loss"] == pytest.approx(scalars["rank_loss_t2i"] + scalars["rank_loss_i2t"], rel=1e-5)


# ----------------------------------------------------------------------------- the ring-buffer pool

class DequePool:
    """The pool as it was before the ring buffer: the last N batches, concatenated whole on every lookup."""

    def __init__(self, capacity: int):
        self.batches = collections.deque(maxlen=capacity)

    def add(self, batch: dict) -> None:
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def rows(self, keys: tuple[str, ...], index: torch.Tensor) -> dict:
        return {k: pad_cat([b[k] for b in self.batches], -1 if k in ("word_index", "word_to_region") else 0)[index]
                for k in keys if k in self.batches[0]}

    def image_ids(self) -> torch.Tensor:
        return torch.cat([b["image_id"] for b in self.batches])


def varying_batch(gen: torch.Generator, b: int, first_id: int) -> dict:
    """make_batch with a random region width and word_index, so both padded dimensions vary between adds."""
    batch = make_batch(gen, b, first_id)
    regions = int(torch.randint(2, REGIONS + 1, (1,), generator=gen))
    for key in ("region_feat", "region_pos", "region_mask"):
        batch[key] = batch[key][:, :regions].contiguous()
    batch["word_index"] = torch.where(batch["text_mask"], torch.arange(batch["input_ids"].shape[1]), -1)
    batch["text_id"] = batch["image_id"] * 10
    return batch


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("widths", [PoolWidths(), PoolWidths(text=12, regions=REGIONS)], ids=["grown", "preallocated"])
def test_ring_pool_returns_what_the_deque_pool_returned(widths):
    """Over adds with varying text / region widths and several wrap-arounds, every lookup (rows, order,
    padding, dtypes) equals the concatenating pool's, and the row numbering puts the newest batch last."""
    gen, b, capacity = torch.Generator().manual_seed(4), 4, 3
    ring, ref = CandidatePool(capacity, widths), DequePool(capacity)
    for i in range(11):
        batch = varying_batch(gen, b, 10 * i)
        ring.add(batch)
        ref.add(batch)
        assert len(ring) == len(ref.image_ids()) == b * min(i + 1, capacity)
        assert torch.equal(ring.image_ids(), ref.image_ids())
        assert torch.equal(ring.image_ids()[len(ring) - b:], batch["image_id"])   # the current batch ends the pool
        index = torch.randint(len(ring), (7,), generator=gen)
        assert_same(ring.images(index), ref.rows(IMAGE_KEYS, index))
        assert_same(ring.texts(index), ref.rows(TEXT_KEYS, index))
        grid = torch.randint(len(ring), (2, 3), generator=gen)
        assert_same(ring.images(grid), ref.rows(IMAGE_KEYS, grid))
        draw = (torch.tensor([10 * i, 5]), 3, 7 + i)
        assert torch.equal(ring.draw_per_anchor(*draw[:2], torch.Generator().manual_seed(draw[2])),
                           ref_draw(ref, *draw))


def ref_draw(ref: DequePool, anchors: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The deque pool's draw_per_anchor (the same formula over its image ids)."""
    valid = anchors.unsqueeze(1) != ref.image_ids().unsqueeze(0)
    keys = torch.rand(valid.shape, generator=torch.Generator().manual_seed(seed)).masked_fill_(~valid, 2.0)
    return keys.topk(n, dim=1, largest=False, sorted=False).indices


def test_ring_pool_writes_in_place_and_lookups_copy_only_the_rows_asked_for():
    gen, b, capacity = torch.Generator().manual_seed(6), 4, 5
    pool = CandidatePool(capacity, PoolWidths(text=12, regions=REGIONS))
    pool.add(varying_batch(gen, b, 0))
    storage = {key: t.data_ptr() for key, t in pool._store.items()}
    allocated = pool.nbytes()
    assert "text_id" not in storage                      # only what lookups read is kept
    assert allocated == sum(t.numel() * t.element_size() for t in pool._store.values())
    for i in range(1, 3 * capacity):                     # several wrap-arounds
        pool.add(varying_batch(gen, b, 10 * i))
        assert {key: t.data_ptr() for key, t in pool._store.items()} == storage
        assert pool.nbytes() == allocated
    assert pool._store["region_feat"].shape == (capacity * b, REGIONS, FEAT)
    assert pool._store["input_ids"].shape == (capacity * b, 12)
    rows = torch.tensor([0, 5, len(pool) - 1])
    images, texts = pool.images(rows), pool.texts(rows)
    assert images["region_feat"].shape[0] == texts["input_ids"].shape[0] == 3
    assert images["region_feat"].data_ptr() != pool._store["region_feat"].data_ptr()
    assert texts["input_ids"].shape[1] <= 12 and images["region_mask"].shape[1] <= REGIONS
    with pytest.raises(IndexError):
        pool.images(torch.tensor([len(pool)]))


def test_ring_pool_grows_a_width_it_was_not_given():
    gen = torch.Generator().manual_seed(8)
    pool = CandidatePool(2)
    narrow, wide = make_batch(gen, 4, 0), make_batch(gen, 4, 10)
    narrow["input_ids"], narrow["text_mask"] = narrow["input_ids"][:, :3], narrow["text_mask"][:, :3]
    pool.add(narrow)
    pool.add(wide)
    assert pool._store["input_ids"].shape[1] == wide["input_ids"].shape[1]
    assert torch.equal(pool.texts(torch.arange(4))["input_ids"][:, :3], narrow["input_ids"])
    assert not pool.texts(torch.arange(4))["text_mask"][:, 3:].any()


def test_pool_bytes_states_the_preallocated_size():
    cfg = load_config(None, ["data.synthetic={}", "data.image_mode=features", "data.max_regions=5",
                             "data.max_text_len=12", "train.micro_batch_size=4", "finetune.pool_size=18",
                             "finetune.negative_size=3", "finetune.hard_size=1"])
    pool = CandidatePool.for_config(cfg, 4)
    gen = torch.Generator().manual_seed(9)
    for i in range(7):
        batch = varying_batch(gen, 4, 10 * i)
        batch.pop("text_id")
        batch["word_to_region"] = batch["word_index"].clone()
        pool.add(batch)
    assert pool.capacity_batches == pool.batches.maxlen == 5               # 18 samples -> 5 batches of 4
    assert pool.nbytes() == pool_bytes(cfg, feat_dim=FEAT)
    coco = load_config(REPO / "launch" / "configs" / "coco_base.yaml")
    assert pool_bytes(coco) == 4096 * (8 + 25 * 60 + 100 * (4 * 2048 + 7 * 4 + 1))   # feat_dim from the model
