"""What the relation skill is taught with: swapped captions (checked against the synthetic scene truth), the
grounding targets the loader builds from word->object annotations, the grounding loss, the ITM pairs with
swap negatives and the fine-tuning step's swap term (in-process, no DeepSpeed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import SyntheticConfig
from pipeline.data.swaps import attribute_swaps, pick_swap, relation_swap
from pipeline.data.synthetic import RELATION_PHRASES, Fact, draw_split

REPO = Path(__file__).resolve().parent.parent
PHRASES = {" ".join(p): rel for rel, phrases in RELATION_PHRASES.items() for p in phrases}


def parse_caption(text: str, objects_words: list[int]) -> Fact:
    """The Fact a synthetic caption states, read back from its words (kinds are annotated word triples)."""
    words = text.split()
    spans: dict[int, list[int]] = {}
    for i, o in enumerate(objects_words):
        if o >= 0:
            spans.setdefault(o, []).append(i)
    kinds = [tuple(words[i] for i in span) for span in spans.values()]
    relation = None
    if len(kinds) == 2:
        first, second = spans.values()
        between = words[first[-1] + 1:second[0]]
        between = between[1:] if between[:1] == ["is"] else between
        between = between[:-1] if between[-1:] in (["a"], ["the"]) else between
        relation = PHRASES.get(" ".join(between))
    return Fact(kinds[0], kinds[1] if len(kinds) > 1 else None, relation)


@pytest.fixture(scope="module")
def records():
    cfg = SyntheticConfig(train=250, val=4, test=4, relations=2, image_size=64)
    return draw_split(cfg, "train")


def test_relation_swap_exchanges_the_object_phrases_and_skips_conjunctions():
    words = "a small red circle is left of a large blue square".split()
    wo = [-1, 0, 0, 0, -1, -1, -1, -1, 1, 1, 1]
    assert relation_swap(words, wo) == "a large blue square is left of a small red circle"
    words = "there is a small red circle and a large blue square".split()
    assert relation_swap(words, [-1, -1, -1, 0, 0, 0, -1, -1, 1, 1, 1]) is None
    assert relation_swap("a picture with a small red circle".split(), [-1, -1, -1, -1, 0, 0, 0]) is None


def test_attribute_swap_needs_an_object_that_no_longer_exists():
    objects = [{"size": "small", "color": "red", "shape": "circle"},
               {"size": "large", "color": "blue", "shape": "square"},
               {"size": "small", "color": "blue", "shape": "circle"}]
    words = "a small red circle and a large blue square".split()
    wo = [-1, 0, 0, 0, -1, -1, 1, 1, 1]
    swaps = attribute_swaps(words, wo, objects)
    # colour swap names "small blue circle" (exists) and "large red square" (does not): kept
    assert "a small blue circle and a large red square" in swaps
    # size swap: "large red circle" and "small blue square" exist nowhere: kept; the original never comes back
    assert "a large red circle and a small blue square" in swaps and " ".join(words) not in swaps


def test_every_swap_of_the_synthetic_captions_is_false_of_its_image(records):
    kinds = {"relation": 0, "attribute": 0}
    for record in records:
        objects = [o.annotation() for o in record.scene.objects]
        for caption in record.captions:
            assert parse_caption(caption.text, list(caption.word_objects)).holds(record.scene), caption.text
            for choice in range(4):
                swap = pick_swap(caption.text, list(caption.word_objects), objects, choice)
                if swap is None:
                    continue
                is_relation = swap == relation_swap(caption.text.split(), list(caption.word_objects))
                kinds["relation" if is_relation else "attribute"] += 1
                fact = parse_caption(swap, _moved(caption, swap, is_relation))
                assert not fact.holds(record.scene), (caption.text, swap)
    assert kinds["relation"] > 500 and kinds["attribute"] > 500, kinds


def _moved(caption, swap: str, is_relation: bool) -> list[int]:
    """word_objects of the swapped text: a relation swap moves the two phrases, an attribute swap keeps
    the layout (only which object the phrase names changes, which parse_caption does not need)."""
    wo = list(caption.word_objects)
    if not is_relation:
        return wo
    spans = {}
    for i, o in enumerate(wo):
        if o >= 0:
            spans.setdefault(o, []).append(i)
    (a, sa), (b, sb) = spans.items()
    out = wo[:sa[0]] + [b] * len(sb) + wo[sa[-1] + 1:sb[0]] + [a] * len(sa) + wo[sb[-1] + 1:]
    assert len(out) == len(swap.split())
    return out


def test_malformed_annotations_give_no_swap_instead_of_a_crash():
    assert pick_swap("a red circle left of a blue square", [{"x": 1}] * 8, [], 0) is None
    assert pick_swap("a red circle", [-1, 0, 0], [{"size": "small"}, 5], 0) is None
    assert pick_swap("two words", [0], [], 0) is None


# ---------------------------------------------------------------- loader targets and losses

@pytest.fixture(scope="module")
def grounded_batch(tmp_path_factory):
    """A real batch from synthetic shards with swap captions, and the tokenizer."""
    from pipeline.data.loader import BatchStream, LoaderConfig
    from pipeline.data.synthetic import ensure_synthetic_dataset
    from pipeline.data.tokenizer import SentencePieceTokenizer, iter_captions, load_tokenizer
    root = tmp_path_factory.mktemp("grounded")
    cfg = SyntheticConfig(train=64, val=4, test=4, relations=2, image_size=32, shard_samples=32, max_objects=2,
                          large_frac=0.3, small_frac=0.2)
    ensure_synthetic_dataset(root, cfg, progress=False)
    SentencePieceTokenizer.train(iter_captions([str(root / "train")]), root / "tok.model", 100)
    tok = load_tokenizer(root / "tok.model")
    lcfg = LoaderConfig(shards=str(root / "train"), batch_size=16, image_size=32, max_text_len=48, num_workers=0,
                        shuffle_buffer=1, swap_captions=True)
    return next(BatchStream(lcfg, tok, 0, 1)), tok, root


def test_batches_carry_object_centres_for_annotated_words(grounded_batch):
    import json
    import tarfile
    batch, tok, root = grounded_batch
    grounded, centres = batch["word_grounded"], batch["word_centre"]
    assert grounded.shape == batch["input_ids"].shape and grounded.any(dim=1).all()
    assert (batch["word_to_region"][grounded] >= 0).all() and not grounded[~batch["text_mask"]].any()
    metas = {}
    for shard in sorted((root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    metas[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    # every grounded token's target is the centre of some object of its own image (box / 32 px)
    for row in range(batch["input_ids"].shape[0]):
        cands = [np.array([(o["box"][0] + o["box"][2]) / 64, (o["box"][1] + o["box"][3]) / 64])
                 for meta in metas.values() for o in meta["objects"]]
        for t in torch.nonzero(grounded[row]).flatten().tolist():
            target = centres[row, t].numpy()
            assert min(np.abs(c - target).max() for c in cands) < 1e-6
    assert batch["has_swap"].any() and batch["swap_input_ids"].shape[0] == batch["input_ids"].shape[0]
    differs = [(batch["swap_input_ids"][i][batch["swap_text_mask"][i]].tolist()
                != batch["input_ids"][i][batch["text_mask"][i]].tolist()) for i in range(16)]
    assert all(d == bool(h) for d, h in zip(differs, batch["has_swap"].tolist()))


def _tiny_patch_model(vocab: int):
    import models
    torch.manual_seed(0)
    return models.create_model("tiny", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2,
                               intermediate_size=64, itc_dim=16, dropout=0.0, max_text_len=48,
                               image={"image_size": 32})


@pytest.mark.parametrize("settings", [{}, {"attention_weight": 0.0, "regression": "mse", "regression_weight": 10.0}],
                         ids=["attention+l1", "mse-only"])
def test_grounding_loss_is_learnable_and_zero_without_annotations(grounded_batch, one_thread, settings):
    from pipeline.config import GroundingConfig
    from pipeline.train.objectives import grounding_loss
    batch, tok, _ = grounded_batch
    grounding = GroundingConfig(**settings)
    model = _tiny_patch_model(tok.vocab_size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first, accuracies = None, []
    for _ in range(60):
        loss, acc = grounding_loss(model, batch, grounding)
        first = first if first is not None else loss.item()
        accuracies.append(acc)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first, (first, loss.item())
    assert accuracies[-1] > accuracies[0] + 0.2, accuracies   # predicted centres land on their objects
    empty = {**batch, "word_grounded": torch.zeros_like(batch["word_grounded"])}
    loss, acc = grounding_loss(model, empty, grounding)
    assert loss.item() == 0.0 and loss.requires_grad and acc == 0.0


def test_grounding_loss_without_attention_is_the_weighted_centre_mse(grounded_batch):
    """Hand-computed: regression_weight x mean squared centre error of the annotated words; no attention
    logits are asked of the model, and the accuracy counts predicted centres inside the true centre's patch."""
    from pipeline.config import GroundingConfig
    from pipeline.train.objectives import grounding_loss
    batch, tok, _ = grounded_batch
    model = _tiny_patch_model(tok.vocab_size).eval()
    tokens = model.encode_image(batch)
    out = model(batch, image_tokens=tokens, attn_logit_layers=[])
    assert not out.attn_logits
    grounded, centres = batch["word_grounded"], batch["word_centre"]
    predicted = model.grounding_head(out.sequence[:, :grounded.shape[1]][grounded])
    expected = 10.0 * ((predicted - centres[grounded]) ** 2).mean()
    settings = GroundingConfig(attention_weight=0.0, regression="mse", regression_weight=10.0)
    loss, acc = grounding_loss(model, batch, settings, out, tokens.pos)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    side = int(round(tokens.pos.shape[1] ** 0.5))   # a square grid of patches
    cell = lambda xy: (xy[:, 0] * side).floor() * side + (xy[:, 1] * side).floor()   # noqa: E731
    same = (cell(predicted.clamp(0, 0.999)) == cell(centres[grounded])).float().mean().item()
    assert acc == pytest.approx(same)


def test_grounding_needs_annotations(grounded_batch):
    from pipeline.config import GroundingConfig
    from pipeline.errors import UserError
    from pipeline.train.objectives import grounding_loss
    batch, tok, _ = grounded_batch
    plain = {k: v for k, v in batch.items() if k not in ("word_grounded", "word_centre")}
    with pytest.raises(UserError, match="word_objects"):
        grounding_loss(_tiny_patch_model(tok.vocab_size), plain, GroundingConfig())


def test_bce_itm_pairs_each_caption_with_its_image_other_images_and_its_swap(grounded_batch):
    from pipeline.train.objectives import itm_bce_pairs
    batch, _, _ = grounded_batch
    b, k = batch["input_ids"].shape[0], 3
    ids = batch["image_id"].clone()
    ids[1] = ids[0]   # two captions of one image: the pairs between them are not negatives
    batch = {**batch, "image_id": ids}
    texts, rows, labels, counted = itm_bce_pairs(batch, torch.Generator().manual_seed(0), k, swaps=True)
    n_swap = int(batch["has_swap"].sum())
    assert len(rows) == len(labels) == len(counted) == texts["input_ids"].shape[0] == b * (1 + k) + n_swap
    assert torch.equal(rows[:b], torch.arange(b)) and labels[:b].eq(1).all() and labels[b:].eq(0).all()
    width = batch["input_ids"].shape[1]
    for j in range(b, b * (1 + k)):   # another image of the batch with the caption of row j % b
        i = j % b
        assert torch.equal(texts["input_ids"][j, :width], batch["input_ids"][i]) and rows[j] != i
        assert bool(counted[j]) == bool(ids[rows[j]] != ids[i])
    shifts = {int((rows[j] - j) % b) for j in range(b, b * (1 + k))}
    assert len(shifts) == k
    swapped = torch.nonzero(batch["has_swap"]).flatten()
    swap_width = batch["swap_input_ids"].shape[1]
    assert torch.equal(rows[b * (1 + k):], swapped) and counted[b * (1 + k):].all()
    assert torch.equal(texts["input_ids"][b * (1 + k):, :swap_width], batch["swap_input_ids"][swapped])
    assert not counted.all(), "the pairs between the two captions of one image were counted"


def test_bce_itm_trains_the_match_logit_that_the_rank_head_starts_from(grounded_batch, one_thread):
    from pipeline.train.negatives import index_tokens
    from pipeline.train.objectives import itm_bce_loss, itm_bce_pairs
    batch, tok, _ = grounded_batch
    model = _tiny_patch_model(tok.vocab_size)
    texts, rows, labels, counted = itm_bce_pairs(batch, torch.Generator().manual_seed(0), 3, swaps=True)

    def rank_gap() -> float:   # mean rank score of the matched pairs minus that of the negatives
        model.init_rank_from_itm()
        with torch.no_grad():
            tokens = index_tokens(model.encode_image(batch), rows)
            rank = model.rank_head(model(texts, image_tokens=tokens, attn_logit_layers=[]).pooled).squeeze(-1)
        return (rank[counted & (labels == 1)].mean() - rank[counted & (labels == 0)].mean()).item()

    before = rank_gap()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss, _ = itm_bce_loss(model, batch, torch.Generator().manual_seed(0), 3, swaps=True)
        opt.zero_grad()
        loss.backward()
        assert model.itm_head.weight.grad[0].abs().sum() == 0 and model.itm_head.weight.grad[1].abs().sum() > 0
        opt.step()
    assert rank_gap() > before + 0.8, (before, rank_gap())


def test_itm_pairs_turn_half_the_negatives_into_swaps_of_their_own_image(grounded_batch):
    from pipeline.train.objectives import itm_pairs
    batch, _, _ = grounded_batch
    texts, rows, labels = itm_pairs(batch, torch.Generator().manual_seed(0), swaps=True)
    plain_texts, plain_rows, plain_labels = itm_pairs(batch, torch.Generator().manual_seed(0), swaps=False)
    b = batch["input_ids"].shape[0]
    assert texts["input_ids"].shape[0] == b and torch.equal(labels, plain_labels)
    width = batch["swap_input_ids"].shape[1]
    swapped = [i for i in range(b) if not torch.equal(texts["input_ids"][i, :batch["input_ids"].shape[1]],
                                                      batch["input_ids"][i])]
    assert swapped, "no negative became a swap"
    for i in swapped:   # a swap: negative, its own image, its swapped caption
        assert labels[i] == 0 and rows[i] == i and batch["has_swap"][i]
        assert torch.equal(texts["input_ids"][i, :width], batch["swap_input_ids"][i])
    for i in set(range(b)) - set(swapped):
        assert rows[i] == plain_rows[i]


def test_finetune_step_adds_the_swap_hinge_and_the_grounding_term(grounded_batch, one_thread):
    from pipeline.config import load_config
    from pipeline.train.finetune_step import FinetuneStep
    from pipeline.train.negatives import CandidatePool
    batch, tok, _ = grounded_batch
    cfg = load_config(None, ["data.synthetic={}", "train.micro_batch_size=16", "finetune.negative_size=3",
                             "finetune.hard_size=1", "finetune.pool_size=64", "finetune.swap_negatives=true",
                             "finetune.grounding_weight=0.5", "finetune.iais.alignment=none"])
    pool = CandidatePool(4)
    for _ in range(4):
        pool.add(batch)
    ids = batch["image_id"]
    pool.add({**batch, "image_id": ids + 1})
    model = _tiny_patch_model(tok.vocab_size)
    step = FinetuneStep(cfg, model, pool, torch.device("cpu"), 10)
    loss, scalars = step(batch, 0, torch.Generator().manual_seed(0))
    n_swap = int(batch["has_swap"].sum())
    assert scalars["pairs_trained"] == 16 + 2 * 16 + n_swap
    assert scalars["rank_loss_swap"] > 0 and scalars["grounding_loss"] > 0
    loss.backward()
    assert model.grounding_head.out.weight.grad.abs().sum() > 0


def test_a_malformed_word_objects_annotation_is_a_counted_bad_sample(grounded_batch):
    """One bad annotation (a dict where a list per caption belongs) must skip its sample, not kill the worker."""
    import json as _json
    from pipeline.data.decode import BadSample, DecodeSpec, decode_train_sample
    _, tok, _ = grounded_batch
    spec = DecodeSpec(32, (0.5,) * 3, (0.5,) * 3, 48, "patch", 36, swap_captions=True)
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    meta = {"captions": ["a red circle"], "word_objects": {"0": [0, 0, 0]},
            "objects": [{"box": [0, 0, 8, 8], "color": "red", "shape": "circle"}]}
    sample = {"__key__": "k", "png": buf.getvalue(), "json": _json.dumps(meta).encode()}
    with pytest.raises(BadSample) as info:
        decode_train_sample(sample, tok, spec, 0, 0)
    assert info.value.reason == "bad_json"
    meta["word_objects"] = [[-1, 0, 0]]
    meta["objects"] = [{"box": "nope"}]
    sample["json"] = _json.dumps(meta).encode()
    with pytest.raises(BadSample):
        decode_train_sample(sample, tok, spec, 0, 0)
