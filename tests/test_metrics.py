"""Recall@K and Winoground scores on hand-built score matrices."""
import math

import pytest
import torch

from pipeline.evaluation.metrics import retrieval_recalls, winoground_scores


def test_perfect_ranking_one_caption_each():
    scores = torch.eye(12)
    r = retrieval_recalls(scores, torch.arange(12))
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert r[key] == 100.0
    assert r["rsum"] == 600.0 and r["r_mean"] == 100.0


def test_reversed_ranking_puts_correct_item_last():
    n = 12
    scores = -torch.eye(n)  # the correct item has the lowest score of every row and column
    r = retrieval_recalls(scores, torch.arange(n))
    # correct item ranks after the 11 others: never within 10
    assert r["img_r10"] == 0.0 and r["txt_r10"] == 0.0 and r["rsum"] == 0.0


def test_reversed_ranking_with_fewer_items_than_k():
    scores = -torch.eye(4)
    r = retrieval_recalls(scores, torch.arange(4))
    assert r["img_r1"] == 0.0 and r["img_r5"] == 100.0  # rank 3 (0-based) < 5


def test_ties_count_against_the_correct_item():
    # every score equal: nobody wins R@1; with 3 images rank is 2 -> R@5 hit
    r = retrieval_recalls(torch.zeros(3, 3), torch.arange(3))
    assert r["img_r1"] == 0.0 and r["txt_r1"] == 0.0
    assert r["img_r5"] == 100.0
    # one tie with the correct image, rest below: rank 1
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    r = retrieval_recalls(scores, torch.arange(3))
    assert r["img_r1"] == pytest.approx(200.0 / 3)


def test_several_captions_per_image_image_query_hits_with_any_caption():
    # 2 images, captions 0,1,2 -> image 0 and 3,4 -> image 1
    t2i = torch.tensor([0, 0, 0, 1, 1])
    scores = torch.tensor([
        [0.1, 0.9],   # caption of image 0, prefers image 1  (text query miss at R@1)
        [0.8, 0.2],   # caption of image 0, correct
        [0.3, 0.5],   # caption of image 0, prefers image 1
        [0.2, 0.7],   # caption of image 1, correct
        [0.6, 0.4],   # caption of image 1, prefers image 0
    ])
    r = retrieval_recalls(scores, t2i, ks=(1, 2))
    assert r["img_r1"] == pytest.approx(40.0)    # captions 1 and 3
    assert r["img_r2"] == 100.0
    # image 0 column: best correct caption (0.8) is top -> hit at R@1.
    # image 1 column: captions 3 (0.7) and 4 (0.4); wrong caption 0 scores 0.9 -> rank 1 -> miss at R@1
    assert r["txt_r1"] == pytest.approx(50.0)
    assert r["txt_r2"] == 100.0
    assert r["rsum"] == pytest.approx(40 + 100 + 50 + 100)
    assert r["r_mean"] == pytest.approx(r["rsum"] / 4)


def test_image_query_rank_ignores_its_own_other_captions():
    # image 0 has captions 0 and 1; caption 1 scores higher than caption 0 but is also correct
    t2i = torch.tensor([0, 0, 1])
    scores = torch.tensor([[0.5, 0.0], [0.9, 0.0], [0.6, 1.0]])
    r = retrieval_recalls(scores, t2i, ks=(1,))
    assert r["txt_r1"] == 100.0  # image 0: caption 1 first; image 1: caption 2 first


def test_neg_inf_outside_shortlist_and_nan_are_worst():
    scores = torch.tensor([[float("-inf"), float("-inf")], [float("nan"), 1.0]])
    r = retrieval_recalls(scores, torch.tensor([0, 1]), ks=(1,))
    assert r["img_r1"] == 50.0  # text 0: -inf tie with the other image -> miss
    assert r["txt_r1"] == 50.0  # image 0: its caption at -inf, the nan text counts as -inf: tie -> miss


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        retrieval_recalls(torch.zeros(3), torch.arange(3))
    with pytest.raises(ValueError):
        retrieval_recalls(torch.zeros(3, 2), torch.arange(2))


def test_winoground_hand_built_quadruples():
    s = torch.tensor([
        [[2.0, 0.0], [0.0, 2.0]],   # all correct
        [[2.0, 1.0], [3.0, 4.0]],   # image ok (2>1, 4>3); text: s00=2 < s10=3 -> fail
        [[2.0, 3.0], [1.0, 4.0]],   # text ok (2>1, 4>3); image: s00=2 < s01=3 -> fail
        [[1.0, 1.0], [1.0, 1.0]],   # ties fail everything
    ])
    w = winoground_scores(s)
    assert w["text"] == pytest.approx(50.0)
    assert w["image"] == pytest.approx(50.0)
    assert w["group"] == pytest.approx(25.0)


def test_winoground_empty_is_nan():
    w = winoground_scores(torch.zeros(0, 2, 2))
    assert math.isnan(w["group"])
