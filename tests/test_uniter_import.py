"""UNITER checkpoint import: the imported model scores like the original UNITER architecture.

The reference below is written from the structure of the public UNITER code (model/model.py, model/layer.py,
model/itm.py), reading weights by their UNITER state-dict names, one sample at a time with no padding:
UNITER packs [text tokens, image regions] compactly (gather_index), so our padding logic is tested too.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from models import ConfigError, load_uniter_checkpoint

HIDDEN, LAYERS, HEADS, FFN, VOCAB, MAXPOS, IMG_DIM = 128, 2, 2, 256, 40, 24, 2048


pytestmark = pytest.mark.usefixtures("one_thread")


def random_uniter_state(seed=0, old_layernorm_names=False):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    s = {}

    def linear(name, n_out, n_in):
        s[f"{name}.weight"], s[f"{name}.bias"] = t(n_out, n_in), t(n_out, std=0.1)

    def layer_norm(name, n):
        w, b = ("gamma", "beta") if old_layernorm_names else ("weight", "bias")
        s[f"{name}.{w}"], s[f"{name}.{b}"] = 1 + t(n, std=0.1), t(n, std=0.1)

    e = "uniter.embeddings"
    s[f"{e}.word_embeddings.weight"] = t(VOCAB, HIDDEN)
    s[f"{e}.position_embeddings.weight"] = t(MAXPOS, HIDDEN)
    s[f"{e}.token_type_embeddings.weight"] = t(2, HIDDEN)
    layer_norm(f"{e}.LayerNorm", HIDDEN)
    i = "uniter.img_embeddings"
    linear(f"{i}.img_linear", HIDDEN, IMG_DIM)
    layer_norm(f"{i}.img_layer_norm", HIDDEN)
    linear(f"{i}.pos_linear", HIDDEN, 7)
    layer_norm(f"{i}.pos_layer_norm", HIDDEN)
    s[f"{i}.mask_embedding.weight"] = t(2, IMG_DIM)
    layer_norm(f"{i}.LayerNorm", HIDDEN)
    for n in range(LAYERS):
        p = f"uniter.encoder.layer.{n}"
        for part in ("query", "key", "value"):
            linear(f"{p}.attention.self.{part}", HIDDEN, HIDDEN)
        linear(f"{p}.attention.output.dense", HIDDEN, HIDDEN)
        layer_norm(f"{p}.attention.output.LayerNorm", HIDDEN)
        linear(f"{p}.intermediate.dense", FFN, HIDDEN)
        linear(f"{p}.output.dense", HIDDEN, FFN)
        layer_norm(f"{p}.output.LayerNorm", HIDDEN)
    linear("uniter.pooler.dense", HIDDEN, HIDDEN)
    linear("itm_output", 2, HIDDEN)
    linear("rank_output", 1, HIDDEN)
    return s


def reference_rank_score(s, input_ids, img_feat, img_pos):
    """UNITER forward for ONE sample (unpadded text ids [n], regions [m, IMG_DIM], [m, 7]) -> rank logit."""
    def w(name):
        return s.get(name + ".weight", s.get(name + ".gamma"))

    def b(name):
        return s.get(name + ".bias", s.get(name + ".beta"))

    def lin(name, x):
        return x @ w(name).t() + b(name)

    def ln(name, x):
        return F.layer_norm(x, (HIDDEN,), w(name), b(name), eps=1e-12)

    def gelu(x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))

    e, i = "uniter.embeddings", "uniter.img_embeddings"
    types = s[f"{e}.token_type_embeddings.weight"]
    txt = (s[f"{e}.word_embeddings.weight"][input_ids] + s[f"{e}.position_embeddings.weight"][:len(input_ids)]
           + types[0])
    txt = ln(f"{e}.LayerNorm", txt)
    img = ln(f"{i}.img_layer_norm", lin(f"{i}.img_linear", img_feat)) + ln(f"{i}.pos_layer_norm",
                                                                           lin(f"{i}.pos_linear", img_pos))
    img = ln(f"{i}.LayerNorm", img + types[1])
    h = torch.cat([txt, img], 0)
    d = HIDDEN // HEADS
    for n in range(LAYERS):
        p = f"uniter.encoder.layer.{n}"
        q, k, v = (lin(f"{p}.attention.self.{x}", h).view(-1, HEADS, d).transpose(0, 1)
                   for x in ("query", "key", "value"))
        ctx = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        ctx = ctx.transpose(0, 1).reshape(-1, HIDDEN)
        att = ln(f"{p}.attention.output.LayerNorm", lin(f"{p}.attention.output.dense", ctx) + h)
        ffn = lin(f"{p}.output.dense", gelu(lin(f"{p}.intermediate.dense", att)))
        h = ln(f"{p}.output.LayerNorm", ffn + att)
    pooled = torch.tanh(lin("uniter.pooler.dense", h[0]))
    return lin("rank_output", pooled)[0]


def padded_inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    text_lens, region_counts = [5, 9, 3], [4, 2, 6]
    ids = torch.zeros(3, 10, dtype=torch.long)
    feat, pos = torch.randn(3, 7, IMG_DIM, generator=g), torch.zeros(3, 7, 7)
    for r, (n, m) in enumerate(zip(text_lens, region_counts)):
        ids[r, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        xy = torch.rand(m, 2, generator=g) * 0.5
        wh = torch.rand(m, 2, generator=g) * 0.5
        pos[r, :m] = torch.cat([xy, xy + wh, wh, wh.prod(-1, keepdim=True)], -1)
    mask = torch.arange(7)[None] < torch.tensor(region_counts)[:, None]
    batch = dict(input_ids=ids, text_mask=ids != 0, region_feat=feat, region_pos=pos, region_mask=mask)
    return batch, text_lens, region_counts


@pytest.mark.parametrize("old_names", [False, True])
def test_imported_model_scores_like_uniter(old_names):
    state = random_uniter_state(old_layernorm_names=old_names)
    model = load_uniter_checkpoint(state, img_dim=IMG_DIM).eval()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (HIDDEN, LAYERS, HEADS)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_text_len) == (FFN, VOCAB, MAXPOS)
    assert (cfg.image.mode, cfg.image.feat_dim) == ("features", IMG_DIM)
    # UNITER masks a region by zeroing its feature and adding mask_embedding row 1: our learned mask feature
    mask_rows = state["uniter.img_embeddings.mask_embedding.weight"]
    assert torch.equal(model.img_embeddings.mask_feature.data, mask_rows[1])
    batch, text_lens, region_counts = padded_inputs()
    with torch.no_grad():
        ours = model.score(batch)
        expected = torch.stack([
            reference_rank_score(state, batch["input_ids"][r, :n], batch["region_feat"][r, :m],
                                 batch["region_pos"][r, :m])
            for r, (n, m) in enumerate(zip(text_lens, region_counts))])
    assert torch.allclose(ours, expected, atol=1e-5), (ours, expected)


def test_import_from_file_and_rank_init_without_rank_head(tmp_path):
    state = random_uniter_state(seed=1)
    del state["rank_output.weight"], state["rank_output.bias"]
    state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "uniter.pt")
    model = load_uniter_checkpoint(tmp_path / "uniter.pt", img_dim=IMG_DIM).eval()
    batch, _, _ = padded_inputs()
    with torch.no_grad():
        assert torch.allclose(model.score(batch), model.itm_logits(batch)[:, 1], atol=1e-6)


def test_import_errors_are_clear(tmp_path):
    state = random_uniter_state()
    with pytest.raises(ConfigError, match="pass img_dim=2048"):
        load_uniter_checkpoint(state, img_dim=1024)
    with pytest.raises(ConfigError, match="unexpected key"):
        load_uniter_checkpoint(dict(state, **{"vqa_output.weight": torch.zeros(1)}), img_dim=IMG_DIM)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_uniter_checkpoint(tmp_path / "missing.pt")
