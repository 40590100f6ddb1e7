"""WRA / IPOT optimal transport (models/ot.py): marginals, exact-OT agreement, padding, UNITER's loss sign."""
import itertools

import numpy as np
import pytest
import torch

from models.ot import cosine_cost, ipot_plan, wra_distance, wra_loss

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_masks(gen, b, n, p=0.7):
    """Random bool masks [b, n] with at least one real position per row, real positions anywhere."""
    mask = torch.rand(b, n, generator=gen) < p
    mask[torch.arange(b), torch.randint(n, (b,), generator=gen)] = True
    return mask


def _exact_square(cost):
    """Exact OT between uniform n-point marginals: by Birkhoff an optimal plan is a permutation / n."""
    n = cost.shape[0]
    return min(float(cost[range(n), list(p)].mean()) for p in itertools.permutations(range(n)))


def test_cosine_cost_by_hand():
    words = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]]])
    regions = torch.tensor([[[2.0, 0.0], [0.0, -1.0]]])
    expected = torch.tensor([[[0.0, 1.0], [0.4, 1.8], [1.0, 1.0]]])   # a zero vector has cosine 0
    assert torch.allclose(cosine_cost(words, regions), expected, atol=1e-6)


def test_plan_marginals_on_random_cost():
    gen = _gen(0)
    b, t, m = 8, 9, 12
    words, regions = torch.randn(b, t, 16, generator=gen), torch.randn(b, m, 16, generator=gen)
    word_mask, region_mask = _random_masks(gen, b, t), _random_masks(gen, b, m)
    cost = cosine_cost(words, regions)
    plan = ipot_plan(cost, word_mask, region_mask)
    n_words = word_mask.sum(1, keepdim=True).float()
    n_regions = region_mask.sum(1, keepdim=True).float()
    assert (plan >= 0).all()
    assert (plan[~word_mask] == 0).all() and (plan.transpose(1, 2)[~region_mask] == 0).all()
    # Words are updated last (UNITER's order), so their marginals are exact; the region marginals converge.
    # Measured on 144 random samples after 50 iterations: region error median ~1e-4, worst 1.2e-3.
    assert torch.allclose(plan.sum(2), word_mask / n_words, atol=1e-6)
    assert torch.allclose(plan.sum(1), region_mask / n_regions, atol=2e-3)
    longer = ipot_plan(cost, word_mask, region_mask, iterations=200)
    assert torch.allclose(longer.sum(1), region_mask / n_regions, atol=2e-4)


def test_plan_is_computed_without_gradient():
    cost = torch.rand(2, 3, 4, requires_grad=True)
    mask_w, mask_r = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    assert not ipot_plan(cost, mask_w, mask_r).requires_grad


@pytest.mark.parametrize("n", [3, 5, 8])
def test_obvious_matching_concentrates_on_the_permutation(n):
    gen = _gen(n)
    perm = torch.randperm(n, generator=gen)
    dim, pad = 2 * n, 3
    eye = torch.eye(dim)
    words = torch.cat([eye[:n], torch.randn(pad, dim, generator=gen) * 5])[None]
    regions = torch.cat([eye[perm.argsort()], torch.randn(pad, dim, generator=gen) * 5])[None]
    assert torch.equal(regions[0, perm], eye[:n])          # word i is identical to region perm[i]
    mask = (torch.arange(n + pad) < n)[None]
    plan = ipot_plan(cosine_cost(words, regions), mask, mask)[0, :n, :n]
    assert torch.equal(plan.argmax(1), perm)
    assert (plan[torch.arange(n), perm] >= 0.9 / n).all()
    assert wra_distance(words, regions, mask, mask).item() < 1e-4
    other = torch.cat([eye[n:], torch.zeros(pad, dim)])[None]   # orthogonal to every word: cost 1
    mismatched = wra_distance(words, other, mask, mask).item()
    assert mismatched == pytest.approx(1.0, abs=1e-5)


def test_distance_matches_exact_ot_on_3x3():
    # Measured |IPOT - exact| over 200 random 3x3 cosine costs (float32 and float64): max 2.8e-3, mean 3e-4.
    gen = _gen(1)
    words = torch.randn(20, 3, 8, generator=gen, dtype=torch.float64)
    regions = torch.randn(20, 3, 8, generator=gen, dtype=torch.float64)
    mask = torch.ones(20, 3, dtype=torch.bool)
    ipot = wra_distance(words.float(), regions.float(), mask, mask)
    cost = cosine_cost(words, regions)
    exact = torch.tensor([_exact_square(c) for c in cost], dtype=torch.float64)
    assert torch.allclose(ipot.double(), exact, atol=5e-3)
    # Not an entropy-blurred plan: the uniform plan (what a large-regularisation Sinkhorn tends to) is far worse.
    assert (cost.mean((1, 2)) - exact).mean() > 0.1


def test_distance_matches_linear_program_on_3x5():
    optimize = pytest.importorskip("scipy.optimize")
    gen = _gen(2)
    n, m = 3, 5
    words, regions = torch.randn(10, n, 8, generator=gen), torch.randn(10, m, 8, generator=gen)
    ipot = wra_distance(words, regions, torch.ones(10, n, dtype=torch.bool), torch.ones(10, m, dtype=torch.bool))
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    a_eq = np.concatenate([rows, cols])
    b_eq = np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)])
    for cost, value in zip(cosine_cost(words.double(), regions.double()).numpy(), ipot.tolist()):
        exact = optimize.linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None)).fun
        assert value == pytest.approx(exact, abs=5e-3)   # measured max 1.1e-3 over 200 random 3x5 costs


def test_padding_does_not_change_the_distance():
    gen = _gen(3)
    b, t, m, d = 4, 5, 7, 16
    words, regions = torch.randn(b, t, d, generator=gen), torch.randn(b, m, d, generator=gen)
    word_mask, region_mask = _random_masks(gen, b, t), _random_masks(gen, b, m)
    base = wra_distance(words, regions, word_mask, region_mask)

    def padded(x, mask, extra):
        """Insert `extra` padded positions with large random vectors at random places."""
        n = x.shape[1] + extra
        real_at = torch.sort(torch.randperm(n, generator=gen)[:x.shape[1]]).values
        big = torch.randn(b, n, d, generator=gen) * 100
        big[:, real_at] = x
        new_mask = torch.zeros(b, n, dtype=torch.bool)
        new_mask[:, real_at] = mask
        return big, new_mask

    words_p, word_mask_p = padded(words, word_mask, 4)
    regions_p, region_mask_p = padded(regions, region_mask, 6)
    assert torch.allclose(wra_distance(words_p, regions_p, word_mask_p, region_mask_p), base, atol=1e-6)
    for i in range(b):   # a sample's distance does not depend on the rest of the batch either
        alone = wra_distance(words[i:i + 1, word_mask[i]], regions[i:i + 1, region_mask[i]],
                             torch.ones(1, int(word_mask[i].sum()), dtype=torch.bool),
                             torch.ones(1, int(region_mask[i].sum()), dtype=torch.bool))
        assert alone.item() == pytest.approx(base[i].item(), abs=1e-6)


def _hand_batch():
    """Sequences `[CLS] w w [SEP] pad | r r pad` (N = 8, H = 3) with distances known in closed form.

    With one word (or one region) the marginals force the plan, so the distance is the mean cost:
      0 matched:    w = e1;       r = (0.6, 0.8, 0)  -> 1 - 0.6 = 0.4
      1 mismatched: w = e1;       r = e2, -e1        -> (1 + 2) / 2 = 1.5
      2 matched:    w = e1, e2;   r = e1             -> (0 + 1) / 2 = 0.5
    """
    gen = _gen(4)
    seq = torch.randn(3, 8, 3, generator=gen) * 3   # CLS / SEP / pad: arbitrary
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    word_mask = torch.zeros(3, 8, dtype=torch.bool)
    region_mask = torch.zeros(3, 8, dtype=torch.bool)
    seq[0, 1], seq[0, 5] = e1, torch.tensor([0.6, 0.8, 0.0])
    word_mask[0, 1], region_mask[0, 5] = True, True
    seq[1, 1], seq[1, 5], seq[1, 6] = e1, e2, -e1
    word_mask[1, 1], region_mask[1, 5:7] = True, True
    seq[2, 1], seq[2, 2], seq[2, 5] = e1, e2, e1
    word_mask[2, 1:3], region_mask[2, 5] = True, True
    matched = torch.tensor([True, False, True])
    return seq, word_mask, region_mask, matched


def test_wra_loss_by_hand():
    seq, word_mask, region_mask, matched = _hand_batch()
    loss = wra_loss(seq, word_mask, region_mask, matched)
    assert loss.item() == pytest.approx((0.4 + 0.5 - 1.5) / 3, abs=1e-6)
    # A sample without words adds to neither sum nor count.
    seq4 = torch.cat([seq, torch.randn(1, 8, 3)])
    word_mask4 = torch.cat([word_mask, torch.zeros(1, 8, dtype=torch.bool)])
    region_mask4 = torch.cat([region_mask, torch.ones(1, 8, dtype=torch.bool)])
    loss4 = wra_loss(seq4, word_mask4, region_mask4, torch.tensor([True, False, True, True]))
    assert loss4.item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize("matched", [True, False])
def test_wra_loss_descent_moves_the_distance_the_right_way(matched):
    gen = _gen(5)
    seq = torch.randn(1, 10, 8, generator=gen).requires_grad_()
    word_mask = torch.zeros(1, 10, dtype=torch.bool)
    region_mask = torch.zeros(1, 10, dtype=torch.bool)
    word_mask[0, 1:4], region_mask[0, 6:9] = True, True   # [CLS] w w w [SEP] pad | r r r pad
    label = torch.tensor([matched])

    def distance():
        with torch.no_grad():
            return wra_distance(seq[:, :6], seq[:, 6:], word_mask[:, :6], region_mask[:, 6:]).item()

    before = distance()
    opt = torch.optim.SGD([seq], lr=0.5)
    for _ in range(10):
        opt.zero_grad()
        wra_loss(seq, word_mask, region_mask, label).backward()
        opt.step()
    after = distance()
    assert (after < before - 0.05) if matched else (after > before + 0.05)
    others = ~(word_mask | region_mask)[0]
    assert (seq.grad[0, others] == 0).all()   # CLS, SEP and padding get no gradient


def test_gradient_flows_through_the_cost_only():
    gen = _gen(6)
    words = torch.randn(2, 4, 8, generator=gen).requires_grad_()
    regions = torch.randn(2, 5, 8, generator=gen).requires_grad_()
    word_mask, region_mask = _random_masks(gen, 2, 4), _random_masks(gen, 2, 5)
    dist = wra_distance(words, regions, word_mask, region_mask)
    grads = torch.autograd.grad(dist.sum(), (words, regions))
    cost = cosine_cost(words, regions) * (word_mask[:, :, None] & region_mask[:, None, :])
    plan = ipot_plan(cost.detach(), word_mask, region_mask)
    expected = torch.autograd.grad((cost * plan).sum(), (words, regions))
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_no_nan_without_words_or_regions():
    gen = _gen(7)
    seq = torch.randn(3, 8, 4, generator=gen).requires_grad_()
    word_mask = torch.zeros(3, 8, dtype=torch.bool)
    region_mask = torch.zeros(3, 8, dtype=torch.bool)
    word_mask[0, 1:3], region_mask[0, 5:7] = True, True   # a normal sample
    region_mask[1, 5:8] = True                             # no words
    word_mask[2, 1:4] = True                               # no regions
    dist = wra_distance(seq[:, :5], seq[:, 5:], word_mask[:, :5], region_mask[:, 5:])
    assert torch.isfinite(dist).all() and (dist[1:] == 0).all()
    loss = wra_loss(seq, word_mask, region_mask, torch.tensor([True, True, False]))
    assert loss.item() == pytest.approx(dist[0].item(), abs=1e-6)
    loss.backward()
    assert torch.isfinite(seq.grad).all()
    empty = wra_loss(seq, torch.zeros_like(word_mask), region_mask, torch.tensor([True, False, True]))
    assert empty.item() == 0.0 and empty.requires_grad


def test_bfloat16_input_is_computed_in_float32():
    gen = _gen(8)
    words, regions = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    word_mask, region_mask = _random_masks(gen, 2, 4), _random_masks(gen, 2, 6)
    low = wra_distance(words.bfloat16(), regions.bfloat16(), word_mask, region_mask)
    ref = wra_distance(words.bfloat16().float(), regions.bfloat16().float(), word_mask, region_mask)
    assert low.dtype == torch.float32
    assert torch.equal(low, ref)
