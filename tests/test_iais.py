"""IAIS / ISD maths (models/iais.py): hand-built block attentions and a per-sample loop from DESIGN.md."""
import math

import numpy as np
import pytest
import torch

from models.iais import annotated_words, grounding_hits, iais_loss, isd, isd_annotated

torch.set_num_threads(1)
ALIGNMENTS = ("singular", "distributed", "congruence")

# ---------------------------------------------------------------- hand-built cases (numpy expectations)
# Sequence [CLS, w1, w2, SEP, r1, r2]: logits of a block are log-probabilities (+ a row shift, which a
# softmax ignores), so the block attentions below are exact.
S_LL = np.array([[0.75, 0.25], [0.5, 0.5]])
S_VV = np.array([[0.9, 0.1], [0.2, 0.8]])
S_LV = np.array([[0.6, 0.4], [0.3, 0.7]])   # word argmax regions: a = [0, 1]
S_VL = np.array([[0.1, 0.9], [0.8, 0.2]])   # region argmax words: b = [1, 0]
WORDS, REGIONS = [1, 2], [4, 5]


def _logits_from_blocks(blocks, n=6, seed=0):
    """[1, H, n, n] logits whose word/region blocks have the given softmaxes; other entries random."""
    gen = np.random.default_rng(seed)
    heads = []
    for ll, vv, lv, vl in blocks:
        a = gen.normal(size=(n, n)) * 3
        for rows, cols, block in ((WORDS, WORDS, ll), (REGIONS, REGIONS, vv), (WORDS, REGIONS, lv),
                                  (REGIONS, WORDS, vl)):
            shift = gen.normal(size=(len(rows), 1)) * 5
            a[np.ix_(rows, cols)] = np.log(block) + shift
        heads.append(a)
    return torch.tensor(np.stack(heads)[None], dtype=torch.float32)


def _masks(n=6):
    word = torch.zeros(1, n, dtype=torch.bool)
    region = torch.zeros(1, n, dtype=torch.bool)
    word[0, WORDS] = True
    region[0, REGIONS] = True
    return word, region


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_mkl(p, q, eps=0.0):
    """mKL, or with eps mKL_eps: the eps only inside the log of the distribution compared against."""
    p_to_q = (p * (np.log(p) - np.log(q + eps))).sum(-1)
    q_to_p = (q * (np.log(q) - np.log(p + eps))).sum(-1)
    return float((p_to_q + q_to_p).mean())


def test_singular_language_side_by_hand():
    # a = [0, 1] so the gathered matrix is S_VV itself; row 0: softmax([0.9, 0.1]) = [0.68997, 0.31003].
    pseudo = np.array([[1 / (1 + math.exp(-0.8)), 1 / (1 + math.exp(0.8))],
                       [1 / (1 + math.exp(0.6)), 1 / (1 + math.exp(-0.6))]])
    assert pseudo[0, 0] == pytest.approx(0.689974, abs=1e-6)
    expected = _np_mkl(S_LL, pseudo)
    word, region = _masks()
    got = isd(_logits_from_blocks([(S_LL, S_VV, S_LV, S_VL)]), word, region, "singular", "L")
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(expected, rel=1e-5)


def test_singular_vision_side_by_hand():
    # b = [1, 0]: P_V[r, s] = softmax_s S_LL[b(r), b(s)] -> rows softmax([0.5, 0.5]), softmax([0.25, 0.75]).
    gathered = np.array([[0.5, 0.5], [0.25, 0.75]])
    expected = _np_mkl(S_VV, _np_softmax(gathered))
    word, region = _masks()
    got = isd(_logits_from_blocks([(S_LL, S_VV, S_LV, S_VL)]), word, region, "singular", "V")
    assert float(got[0]) == pytest.approx(expected, rel=1e-5)


def test_singular_two_words_on_one_region_by_hand():
    lv = np.array([[0.2, 0.8], [0.1, 0.9]])  # both words -> region 1: every gathered entry is S_VV[1, 1]
    expected = _np_mkl(S_LL, np.full((2, 2), 0.5))
    word, region = _masks()
    got = isd(_logits_from_blocks([(S_LL, S_VV, lv, S_VL)]), word, region, "singular", "L")
    assert float(got[0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alignment", ["distributed", "congruence"])
def test_distributed_and_congruence_by_hand(alignment):
    word, region = _masks()
    logits = _logits_from_blocks([(S_LL, S_VV, S_LV, S_VL)])
    if alignment == "distributed":
        p_l, p_v = S_LV @ S_VL, S_VL @ S_LV
    else:
        p_l, p_v = S_LV @ S_VV @ S_VL, S_VL @ S_LL @ S_LV
    exp_l, exp_v = _np_mkl(S_LL, p_l, 1e-6), _np_mkl(S_VV, p_v, 1e-6)
    assert float(isd(logits, word, region, alignment, "L")[0]) == pytest.approx(exp_l, rel=1e-5)
    assert float(isd(logits, word, region, alignment, "V")[0]) == pytest.approx(exp_v, rel=1e-5)
    assert float(isd(logits, word, region, alignment, "both")[0]) == pytest.approx(exp_l + exp_v, rel=1e-5)


def test_heads_are_averaged_after_softmax_3x3():
    global WORDS, REGIONS
    saved = WORDS, REGIONS
    WORDS, REGIONS = [1, 2, 3], [5, 6, 7]
    try:
        gen = np.random.default_rng(3)
        heads = [tuple(gen.dirichlet(np.ones(3), size=3) for _ in range(4)) for _ in range(2)]
        logits = _logits_from_blocks(heads, n=9, seed=4)
        ll, vv, lv, vl = (np.mean([h[k] for h in heads], axis=0) for k in range(4))
        word, region = _masks(9)
        a = lv.argmax(1)
        expected = {
            "singular": _np_mkl(ll, _np_softmax(vv[np.ix_(a, a)])),
            "distributed": _np_mkl(ll, lv @ vl, 1e-6),
            "congruence": _np_mkl(ll, lv @ vv @ vl, 1e-6),
        }
        for alignment, value in expected.items():
            got = iais_loss(logits, word, region, alignment, "L")
            assert got.dim() == 0
            assert float(got) == pytest.approx(value, rel=1e-5), alignment
    finally:
        WORDS, REGIONS = saved


def test_isd_annotated_by_hand():
    # Sequence [CLS, w1, w2, w3, SEP, r1, r2, r3]; w1 -> r2, w2 unannotated, w3 -> r3 (positions 6 and 7).
    n = 8
    gen = np.random.default_rng(5)
    ll, vv = gen.dirichlet(np.ones(3), size=3), gen.dirichlet(np.ones(3), size=3)
    logits = np.asarray(gen.normal(size=(n, n)))
    logits[np.ix_([1, 2, 3], [1, 2, 3])] = np.log(ll)
    logits[np.ix_([5, 6, 7], [5, 6, 7])] = np.log(vv)
    word = torch.tensor([[False, True, True, True, False, False, False, False]])
    region = torch.tensor([[False] * 5 + [True] * 3])
    w2r = torch.tensor([[-1, 6, -1, 7, -1, -1, -1, -1]])
    # restrict S_LL to words {w1, w3} and S_VV to regions {r2, r3}, renormalise rows
    ll_a = ll[np.ix_([0, 2], [0, 2])]
    ll_a = ll_a / ll_a.sum(1, keepdims=True)
    vv_a = vv[np.ix_([1, 2], [1, 2])]
    vv_a = vv_a / vv_a.sum(1, keepdims=True)
    expected = _np_mkl(ll_a, vv_a)  # r(A) = (r2, r3): the restricted S_VV, no softmax
    got = isd_annotated(torch.tensor(logits[None, None], dtype=torch.float32), word, region, w2r)
    assert float(got[0]) == pytest.approx(expected, rel=1e-5)
    # no annotated word (or an annotation pointing at a non-region) -> 0, no NaN
    none = torch.tensor([[-1, 2, -1, -1, -1, -1, -1, -1]])
    scores = torch.tensor(logits[None, None], dtype=torch.float32)
    assert float(isd_annotated(scores, word, region, none)[0]) == 0


# ---------------------------------------------------------------- per-sample loop straight from DESIGN.md
def _loop_mkl(scores, word_mask, region_mask, alignment, side):
    out = []
    for b in range(scores.shape[0]):
        a = scores[b].double()
        w = word_mask[b].nonzero().flatten()
        r = region_mask[b].nonzero().flatten()
        ll = torch.softmax(a[:, w][:, :, w], -1).mean(0)
        vv = torch.softmax(a[:, r][:, :, r], -1).mean(0)
        lv = torch.softmax(a[:, w][:, :, r], -1).mean(0)
        vl = torch.softmax(a[:, r][:, :, w], -1).mean(0)
        total = 0.0
        for s in (("L", "V") if side == "both" else (side,)):
            own, other, cross, back = (ll, vv, lv, vl) if s == "L" else (vv, ll, vl, lv)
            if alignment == "singular":
                idx = cross.argmax(-1)
                pseudo = torch.softmax(other[idx][:, idx], -1)
                lp, lq = own.log(), pseudo.log()
            else:
                pseudo = cross @ back if alignment == "distributed" else cross @ other @ back
                kl = (own * (own.log() - (pseudo + 1e-6).log())).sum(-1) \
                    + (pseudo * (pseudo.log() - (own + 1e-6).log())).sum(-1)
                total = total + kl.mean()
                continue
            kl = (own * (lp - lq)).sum(-1) + (pseudo * (lq - lp)).sum(-1)
            total = total + kl.mean()
        out.append(total)
    return torch.stack(out)


def _random_batch(lengths, text_len=8, image_len=7, heads=3, seed=0):
    """Layout [CLS] w.. [SEP] (text pad) r.. (image pad) with per-sample word/region counts."""
    gen = torch.Generator().manual_seed(seed)
    n = text_len + image_len
    word = torch.zeros(len(lengths), n, dtype=torch.bool)
    region = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, (nw, nr) in enumerate(lengths):
        word[b, 1:1 + nw] = True
        region[b, text_len:text_len + nr] = True
    scores = torch.randn(len(lengths), heads, n, n, generator=gen) * 2
    return scores, word, region


LENGTHS = [(3, 5), (6, 7), (1, 2), (4, 1), (5, 4)]
EQUAL_LENGTHS = [(6, 7)] * 3  # no padding inside the word/region spans: the unmasked fast path


@pytest.mark.parametrize("lengths", [LENGTHS, EQUAL_LENGTHS], ids=["ragged", "equal"])
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("side", ["L", "V", "both"])
def test_matches_per_sample_loop(alignment, side, lengths):
    scores, word, region = _random_batch(lengths)
    expected = _loop_mkl(scores, word, region, alignment, side)
    got = isd(scores, word, region, alignment, side)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iais_loss(scores, word, region, alignment, side).double(), expected.mean(),
                               rtol=1e-5, atol=1e-5)


def _insert_padding(scores, word, region, text_extra, image_extra, text_len=8):
    """Adds text padding before the regions and image padding at the end, with random logits."""
    b, h, n, _ = scores.shape
    keep = list(range(text_len)) + [None] * text_extra + list(range(text_len, n)) + [None] * image_extra
    m = len(keep)
    big = torch.randn(b, h, m, m) * 10
    pos = torch.tensor([i for i, k in enumerate(keep) if k is not None])
    big[:, :, pos[:, None], pos[None, :]] = scores
    new_word = torch.zeros(b, m, dtype=torch.bool)
    new_region = torch.zeros(b, m, dtype=torch.bool)
    new_word[:, pos], new_region[:, pos] = word, region
    return big, new_word, new_region, pos


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_extra_padding_changes_nothing(alignment):
    scores, word, region = _random_batch(LENGTHS, seed=1)
    padded, pword, pregion, pos = _insert_padding(scores, word, region, 3, 4)
    for side in ("L", "V", "both"):
        torch.testing.assert_close(isd(padded, pword, pregion, alignment, side),
                                   isd(scores, word, region, alignment, side), rtol=1e-6, atol=1e-6)
    w2r = torch.full(word.shape, -1, dtype=torch.long)
    w2r[:, 1], w2r[:, 2] = 8, 9
    pw2r = torch.full(pword.shape, -1, dtype=torch.long)
    pw2r[:, pos] = torch.where(w2r >= 0, pos[w2r.clamp_min(0)], w2r)
    torch.testing.assert_close(isd_annotated(padded, pword, pregion, pw2r),
                               isd_annotated(scores, word, region, w2r), rtol=1e-6, atol=1e-6)


def test_samples_without_words_or_regions_give_zero_and_are_excluded():
    scores, word, region = _random_batch([(3, 4), (0, 4), (3, 0)], seed=2)
    scores.requires_grad_(True)
    for alignment in ALIGNMENTS:
        per_sample = isd(scores, word, region, alignment, "both")
        assert per_sample[1] == 0 and per_sample[2] == 0 and per_sample[0] > 0
        loss = iais_loss(scores, word, region, alignment, "both")
        torch.testing.assert_close(loss, per_sample[0])
        (grad,) = torch.autograd.grad(loss, scores)
        assert torch.isfinite(grad).all() and grad[1:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_computes_in_fp32(dtype):
    scores, word, region = _random_batch(LENGTHS, seed=3)
    low = scores.to(dtype)
    for alignment in ALIGNMENTS:
        got = iais_loss(low, word, region, alignment, "both")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, iais_loss(low.float(), word, region, alignment, "both"))
        full = iais_loss(scores, word, region, alignment, "both")
        torch.testing.assert_close(got, full, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("lengths", [[(3, 3), (2, 4)], [(3, 4), (3, 4)]], ids=["ragged", "equal"])
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_gradcheck_float64(alignment, lengths):
    scores, word, region = _random_batch(lengths, text_len=5, image_len=5, heads=2, seed=4)
    scores = scores.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: iais_loss(s, word, region, alignment, "both"), (scores,))


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_gradients_reach_both_modalities_and_never_padding(alignment):
    scores, word, region = _random_batch(LENGTHS, seed=5)
    scores.requires_grad_(True)
    (grad,) = torch.autograd.grad(iais_loss(scores, word, region, alignment, "both"), scores)
    ww = word[:, None, :, None] & word[:, None, None, :]
    rr = region[:, None, :, None] & region[:, None, None, :]
    real = (word | region)
    pad = ~(real[:, None, :, None] & real[:, None, None, :])
    assert grad[ww.expand_as(grad)].abs().sum() > 0
    assert grad[rr.expand_as(grad)].abs().sum() > 0
    assert grad[pad.expand_as(grad)].abs().sum() == 0


def test_bad_arguments_raise():
    scores, word, region = _random_batch(LENGTHS)
    with pytest.raises(ValueError, match="alignment"):
        iais_loss(scores, word, region, "sparse")
    with pytest.raises(ValueError, match="side"):
        isd(scores, word, region, side="T")
    with pytest.raises(ValueError, match="word_mask"):
        iais_loss(scores, word.long(), region)
    with pytest.raises(ValueError, match="scores"):
        iais_loss(scores[0], word, region)
    with pytest.raises(ValueError, match="word_to_region"):
        isd_annotated(scores, word, region, torch.full(word.shape, 99))


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_matches_loop_with_scattered_positions(alignment):
    """Words and regions anywhere in the sequence (interleaved, different per sample)."""
    gen = torch.Generator().manual_seed(7)
    b, n = 4, 12
    kind = torch.randint(0, 3, (b, n), generator=gen)  # 0 other, 1 word, 2 region
    kind[:, 3], kind[:, 7] = 1, 2
    word, region = kind == 1, kind == 2
    scores = torch.randn(b, 2, n, n, generator=gen) * 2
    for side in ("L", "V", "both"):
        torch.testing.assert_close(isd(scores, word, region, alignment, side).double(),
                                   _loop_mkl(scores, word, region, alignment, side), rtol=1e-5, atol=1e-5)


def _loop_isda(scores, word_mask, region_mask, word_to_region):
    """ISDa as DESIGN.md defines it, per sample: mKL(renorm(S_LL[A, A]), renorm(S_VV[r(A), r(A)]))."""
    out = []
    for b in range(scores.shape[0]):
        a = scores[b].double()
        w = word_mask[b].nonzero().flatten()
        r = region_mask[b].nonzero().flatten()
        ll = torch.softmax(a[:, w][:, :, w], -1).mean(0)
        vv = torch.softmax(a[:, r][:, :, r], -1).mean(0)
        targets = word_to_region[b, w]
        keep = torch.tensor([int(t) in r.tolist() for t in targets], dtype=torch.bool)
        if not keep.any():
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        region_index = torch.tensor([r.tolist().index(int(t)) for t in targets[keep]])
        ll_a = ll[keep][:, keep]
        ll_a = ll_a / ll_a.sum(1, keepdim=True)
        vv_a = vv[region_index][:, region_index]
        vv_a = vv_a / vv_a.sum(1, keepdim=True)
        kl = (ll_a * (ll_a.log() - vv_a.log())).sum(-1) + (vv_a * (vv_a.log() - ll_a.log())).sum(-1)
        out.append(kl.mean())
    return torch.stack(out)


def test_isd_annotated_matches_loop():
    scores, word, region = _random_batch(LENGTHS, seed=8)
    gen = torch.Generator().manual_seed(9)
    w2r = torch.randint(7, 15, word.shape, generator=gen)  # some hit padding regions: unannotated
    w2r[torch.rand(word.shape, generator=gen) < 0.3] = -1
    torch.testing.assert_close(isd_annotated(scores, word, region, w2r).double(),
                               _loop_isda(scores, word, region, w2r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alignment", ["singular", "distributed", "congruence"])
def test_attention_maps_of_one_sample_match_isd(alignment):
    from models.iais import attention_maps
    torch.manual_seed(3)
    n = 9
    scores = torch.randn(1, 2, n, n, dtype=torch.float64)
    word_mask = torch.zeros(1, n, dtype=torch.bool)
    region_mask = torch.zeros(1, n, dtype=torch.bool)
    word_mask[0, 1:4] = True
    region_mask[0, 5:9] = True
    maps = attention_maps(scores[0], torch.arange(1, 4), torch.arange(5, 9), alignment)
    eps = 0.0 if alignment == "singular" else 1e-6

    def mkl(p, q):
        return ((p * (p.log() - (q + eps).log())).sum(1) + (q * (q.log() - (p + eps).log())).sum(1)).mean()

    for side, (s, pseudo) in {"L": ("S_LL", "P_L"), "V": ("S_VV", "P_V")}.items():
        expected = isd(scores, word_mask, region_mask, alignment, side)[0]
        assert torch.allclose(mkl(maps[s], maps[pseudo]).to(expected.dtype), expected, atol=1e-5)


# ---------------------------------------------------------------- parity with the authors' iais_distributed
def _authors_distributed(scores, word_mask, region_mask, alignment, side):
    """The reference's way: per sample, KLDivLoss(log(S + 1e-6), P) + KLDivLoss(log(P + 1e-6), S)."""
    kl_div = torch.nn.KLDivLoss(reduction="batchmean")
    out = []
    for b in range(scores.shape[0]):
        a = scores[b].double()
        w, r = word_mask[b].nonzero().flatten(), region_mask[b].nonzero().flatten()
        txt, img = torch.softmax(a[:, w][:, :, w], -1).mean(0), torch.softmax(a[:, r][:, :, r], -1).mean(0)
        t2i, i2t = torch.softmax(a[:, w][:, :, r], -1).mean(0), torch.softmax(a[:, r][:, :, w], -1).mean(0)
        if side == "L":
            own, pseudo = txt, (t2i @ i2t if alignment == "distributed" else t2i @ img @ i2t)
        else:
            own, pseudo = img, (i2t @ t2i if alignment == "distributed" else i2t @ txt @ t2i)
        out.append(kl_div(torch.log(own + 1e-6), pseudo) + kl_div(torch.log(pseudo + 1e-6), own))
    return torch.stack(out)


@pytest.mark.parametrize("alignment", ["distributed", "congruence"])
@pytest.mark.parametrize("scale", [1.0, 4.0, 8.0])
def test_eps_alignments_match_the_authors_kldivloss(alignment, scale):
    # peaky attention (large scale) is where an eps on both sides of each KL was off by up to ~1e-3
    lengths = [(3, 5), (6, 7), (1, 2), (4, 1), (5, 4), (1, 1)]
    scores, word, region = _random_batch(lengths, seed=11)
    scores = scores.double() * scale
    for side in ("L", "V"):
        expected = _authors_distributed(scores, word, region, alignment, side)
        torch.testing.assert_close(isd(scores, word, region, alignment, side), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_gradients_stay_finite_with_padding_and_underflow(alignment):
    # large logits underflow real probabilities to exactly 0, next to the masked (exactly 0) padding columns
    scores, word, region = _random_batch(LENGTHS, seed=12)
    padded, pword, pregion, _ = _insert_padding(scores * 40, word, region, 2, 3)
    padded.requires_grad_(True)
    loss = iais_loss(padded, pword, pregion, alignment, "both")
    (grad,) = torch.autograd.grad(loss, padded)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ---------------------------------------------------------------- ISDa: relation consistency
# Sequence [CLS, w1..w5, SEP, r1..r5] with one head: a block's logits are log-probabilities plus a row shift.
TOY_WORDS, TOY_REGIONS, TOY_N = list(range(1, 6)), list(range(7, 12)), 12


def _toy(word_logits, region_logits, word_to_region_index, seed=0):
    """[1, 1, N, N] logits with the given word and region blocks (other entries random), masks, w2r."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(TOY_N, TOY_N, generator=gen, dtype=torch.float64) * 3
    rows = torch.randn(TOY_N, 1, generator=gen, dtype=torch.float64) * 5  # a row shift the softmax ignores
    words, regions = torch.tensor(TOY_WORDS), torch.tensor(TOY_REGIONS)
    logits[words[:, None], words[None, :]] = word_logits + rows[words]
    logits[regions[:, None], regions[None, :]] = region_logits + rows[regions]
    word = torch.zeros(1, TOY_N, dtype=torch.bool)
    region = torch.zeros(1, TOY_N, dtype=torch.bool)
    word[0, TOY_WORDS], region[0, TOY_REGIONS] = True, True
    w2r = torch.full((1, TOY_N), -1, dtype=torch.long)
    for i, k in enumerate(word_to_region_index):
        if k >= 0:
            w2r[0, TOY_WORDS[i]] = TOY_REGIONS[k]
    return logits[None, None], word, region, w2r


def _visual_logits(seed=1):
    return torch.randn(5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def _toy_isda(word_logits, region_logits, index=(0, 1, 2, 3, 4)):
    return float(isd_annotated(*_toy(word_logits, region_logits, index))[0])


def test_isda_is_zero_for_identical_relations_and_positive_otherwise():
    visual = _visual_logits()
    consistent = _toy_isda(visual.clone(), visual)
    uniform = _toy_isda(torch.zeros(5, 5, dtype=torch.float64), visual)
    inconsistent = _toy_isda(visual.T.contiguous(), visual)
    assert consistent == pytest.approx(0, abs=1e-6)
    assert uniform > 0.05 and inconsistent > 0.05
    # the old singular-softmax version scored flat attention better than perfect consistency
    assert consistent < uniform


def test_isda_consistent_up_to_row_scaling_with_unannotated_words_and_regions():
    # words w1..w3 -> regions r2, r1, r5; w4, w5 unannotated; S_LL[A, A] = S_VV[r(A), r(A)] up to row scaling
    visual = _visual_logits(2)
    index = [1, 0, 4, -1, -1]
    words = torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    a = torch.tensor([0, 1, 2])
    words[a[:, None], a[None, :]] = visual[torch.tensor(index[:3])][:, torch.tensor(index[:3])]
    assert _toy_isda(words, visual, index) == pytest.approx(0, abs=1e-6)
    words[0, 1] += 1.0
    assert _toy_isda(words, visual, index) > 1e-3


def test_isda_grows_as_relations_blend_toward_an_inconsistent_pattern():
    visual = _visual_logits(4)
    inconsistent = visual.flip(0, 1).contiguous()
    values = [_toy_isda((1 - t) * visual + t * inconsistent, visual) for t in (0, 0.25, 0.5, 0.75, 1)]
    assert values[0] == pytest.approx(0, abs=1e-6)
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_isda_words_sharing_a_region_by_hand():
    # w1, w2 -> r1; w3 -> r2; w4, w5 unannotated: V = renorm(S_VV[[0, 0, 1]][:, [0, 0, 1]])
    visual, words = _visual_logits(5), _visual_logits(6)
    index = [0, 0, 1, -1, -1]
    vv = torch.softmax(visual, -1).numpy()
    ll = torch.softmax(words, -1).numpy()
    v = vv[np.ix_([0, 0, 1], [0, 0, 1])]
    ll_a = ll[np.ix_([0, 1, 2], [0, 1, 2])]
    expected = _np_mkl(ll_a / ll_a.sum(1, keepdims=True), v / v.sum(1, keepdims=True))
    assert _toy_isda(words, visual, index) == pytest.approx(expected, rel=1e-9)
    # identical relations with the repeated region still give 0
    shared = visual[torch.tensor([0, 0, 1])][:, torch.tensor([0, 0, 1])]
    words[:3, :3] = shared
    assert _toy_isda(words, visual, index) == pytest.approx(0, abs=1e-6)


def test_isda_padding_and_batching_change_nothing():
    scores, word, region = _random_batch(LENGTHS, seed=13)
    w2r = torch.full(word.shape, -1, dtype=torch.long)
    w2r[:, 1], w2r[:, 2], w2r[:, 3] = 8, 8, 9  # two words on one region
    padded, pword, pregion, pos = _insert_padding(scores, word, region, 3, 2)
    pw2r = torch.full(pword.shape, -1, dtype=torch.long)
    pw2r[:, pos] = torch.where(w2r >= 0, pos[w2r.clamp_min(0)], w2r)
    batched = isd_annotated(scores, word, region, w2r)
    torch.testing.assert_close(isd_annotated(padded, pword, pregion, pw2r), batched, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched.double(), _loop_isda(scores, word, region, w2r), rtol=1e-5, atol=1e-5)
    for b in range(len(LENGTHS)):
        one = isd_annotated(scores[b:b + 1], word[b:b + 1], region[b:b + 1], w2r[b:b + 1])
        torch.testing.assert_close(one[0], batched[b], rtol=1e-5, atol=1e-6)
    hits = grounding_hits(scores, word, region, w2r)
    assert torch.equal(grounding_hits(padded, pword, pregion, pw2r)[:, pos], hits)


# ---------------------------------------------------------------- grounding hits
def test_grounding_hits_by_hand():
    # [CLS, w1, w2, w3, SEP, r1, r2, pad]; w1 -> r1, w2 -> r2, w3 unannotated; 2 heads
    n = 8
    logits = torch.zeros(1, 2, n, n)
    word = torch.tensor([[False, True, True, True, False, False, False, False]])
    region = torch.tensor([[False] * 5 + [True, True, False]])
    logits[0, :, :, 7] = 50.0  # a padding column never wins
    logits[0, :, 1, 5] = 3.0   # w1: both heads on r1 -> hit
    # w2: head 0 mildly on r1 (0.62), head 1 sharply on r2 (0.9997): the head mean picks r2
    logits[0, 0, 2, 5], logits[0, 1, 2, 6] = 0.5, 8.0
    logits[0, :, 3, 6] = 5.0   # w3 points at r2 but is unannotated
    w2r = torch.tensor([[-1, 5, 6, -1, -1, -1, -1, -1]])
    hits = grounding_hits(logits, word, region, w2r)
    assert hits.tolist() == [[False, True, True, False, False, False, False, False]]
    wrong = torch.tensor([[-1, 6, 5, 5, -1, -1, -1, -1]])
    assert not grounding_hits(logits, word, region, wrong).any()
    assert annotated_words(word, region, wrong).sum() == 3
    # an annotation pointing at padding is not annotated, so never a hit
    assert not grounding_hits(logits, word, region, torch.tensor([[-1, 7, -1, -1, -1, -1, -1, -1]])).any()
