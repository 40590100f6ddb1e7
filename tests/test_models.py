"""RetrievalModel: image modes, masks, attention paths, heads, persistence, checkpointing, configs."""
import json

import pytest
import timm
import torch
from safetensors import safe_open

import models
from models import ConfigError, ImageEncoderConfig, ModelConfig, create_model
from models.image_encoder import box_features, grid_box_features

VOCAB = 50


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                max_text_len=16, dropout=0.0, itc_dim=16)
    torch.manual_seed(0)
    return create_model("tiny", **models.registry.merge(base, overrides)).eval()


def text_batch(lengths, width=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = 2, 3
    return dict(input_ids=ids, text_mask=ids != 0)


def feature_batch(counts, width=None, dim=24, seed=2):
    g = torch.Generator().manual_seed(seed)
    width = width or max(counts)
    feat = torch.randn(len(counts), width, dim, generator=g)
    corners = torch.rand(len(counts), width, 2, generator=g) * 40
    boxes = torch.cat([corners, corners + 8 + torch.rand(len(counts), width, 2, generator=g) * 20], -1)
    mask = torch.arange(width)[None] < torch.tensor(counts)[:, None]
    return dict(region_feat=feat, region_pos=box_features(boxes, 64.0, 64.0), region_mask=mask, boxes=boxes)


FEATURES = dict(image=dict(mode="features", backbone=None, feat_dim=24))


# ---- image side ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone,size,grid", [("test_vit", 64, 4), ("test_resnet", 96, 3)])
def test_patch_mode_shapes_and_boxes(backbone, size, grid):
    model = tiny(image=dict(backbone=backbone, image_size=size))
    batch = dict(text_batch([5, 7]), pixels=torch.randn(2, 3, size, size))
    tokens = model.encode_image(batch)
    assert tokens.feat.shape == (2, grid * grid, model.image_encoder.feat_dim)
    assert tokens.mask.all() and tokens.pos.shape == (2, grid * grid, 7)
    assert torch.allclose(tokens.pos[0, 0], torch.tensor([0, 0, 1 / grid, 1 / grid, 1 / grid, 1 / grid,
                                                          1 / grid ** 2]))
    assert torch.allclose(tokens.pos[0, -1, :4], torch.tensor([1 - 1 / grid, 1 - 1 / grid, 1.0, 1.0]))
    out = model(batch)
    assert out.sequence.shape == (2, 7 + grid * grid, 32) and out.text_len == 7
    assert out.word_mask.sum(1).tolist() == [3, 5]
    assert out.region_mask.sum(1).tolist() == [grid * grid] * 2
    assert not (out.word_mask & out.region_mask).any()
    assert model.score(batch).shape == (2,)


def test_a_vit_without_blocks_is_a_patch_embedding_stem():
    # a depth-0 timm ViT lists no feature_info: the patch grid comes from its patch embedding
    model = tiny(image=dict(backbone="test_vit", image_size=64, backbone_kwargs=dict(depth=0)))
    assert len(model.image_encoder.backbone.blocks) == 0
    tokens = model.encode_image(dict(pixels=torch.randn(2, 3, 64, 64)))
    assert tokens.feat.shape == (2, 16, model.image_encoder.feat_dim)
    assert torch.allclose(tokens.pos[0, 5, :4], torch.tensor([0.25, 0.25, 0.5, 0.5]))


def test_grid_boxes_tile_the_image():
    pos = grid_box_features(2, 3)
    assert pos.shape == (6, 7)
    assert torch.allclose(pos[:, 4] * pos[:, 5], pos[:, 6])
    assert torch.isclose(pos[:, 6].sum(), torch.tensor(1.0))
    assert torch.allclose(pos[4], torch.tensor([1 / 3, 1 / 2, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6]))


SMALL_SWIN = dict(backbone="swin_tiny_patch4_window7_224", image_size=64,
                  backbone_kwargs=dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4))


@pytest.mark.parametrize("image,prefix", [(dict(backbone="test_vit", image_size=64), 1), (SMALL_SWIN, 0)])
def test_patch_tokens_follow_the_backbone_grid(image, prefix):
    """ViT: prefix (class) token dropped, row-major patches; Swin: NHWC map read row-major."""
    model = tiny(image=image)
    pixels = torch.randn(2, 3, 64, 64)
    tokens = model.encode_image(dict(pixels=pixels))
    raw = model.image_encoder.backbone.forward_features(pixels)
    expected = raw[:, prefix:] if raw.dim() == 3 else raw.flatten(1, 2)
    assert torch.equal(tokens.feat, expected)
    side = int(expected.shape[1] ** 0.5)
    assert torch.allclose(tokens.pos[0], grid_box_features(side, side))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_roi_mode_pools_boxes(backbone):
    model = tiny(image=dict(mode="roi", backbone=backbone, image_size=64))
    regions = feature_batch([3, 5], width=6)
    batch = dict(text_batch([4, 6]), pixels=torch.randn(2, 3, 64, 64), boxes=regions["boxes"],
                 region_mask=regions["region_mask"])
    tokens = model.encode_image(batch)
    assert tokens.feat.shape == (2, 6, model.image_encoder.feat_dim)
    assert torch.allclose(tokens.pos, regions["region_pos"])  # computed from boxes when not given
    assert tokens.mask.sum(1).tolist() == [3, 5]
    # a region's feature depends on its box only
    moved = dict(batch, boxes=batch["boxes"].clone())
    moved["boxes"][0, 1] = torch.tensor([0.0, 0.0, 63.0, 63.0])
    moved_tokens = model.encode_image(moved)
    assert torch.equal(moved_tokens.feat[0, 0], tokens.feat[0, 0])
    assert not torch.allclose(moved_tokens.feat[0, 1], tokens.feat[0, 1])
    out = model(batch)
    assert out.region_mask.sum(1).tolist() == [3, 5] and out.sequence.shape == (2, 12, 32)


def test_roi_scale_maps_pixel_boxes_onto_the_feature_map():
    """On a map whose value is the column index, a box's pooled value is its centre in map coordinates."""
    encoder = tiny(image=dict(mode="roi", backbone="test_resnet")).image_encoder
    fmap = torch.arange(6.0).expand(1, 2, 6, 6)  # a 6x6 map of a 96x96 image: 16 px per cell
    boxes = torch.tensor([[[16.0, 16.0, 48.0, 48.0], [40.0, 0.0, 88.0, 96.0]]])
    tokens = encoder._regions(fmap, dict(pixels=torch.zeros(1, 3, 96, 96), boxes=boxes))
    expected = torch.tensor([32.0, 64.0]) / 16 - 0.5  # pixel-centre convention of roi_align(aligned=True)
    assert torch.allclose(tokens.feat[0, :, 0], expected, atol=1e-5)


def test_features_mode_and_single_modality_passes():
    model = tiny(**FEATURES)
    batch = dict(text_batch([4, 6]), **feature_batch([3, 5]))
    assert model(batch).sequence.shape == (2, 6 + 5, 32)
    text_out = model({k: batch[k] for k in ("input_ids", "text_mask")})
    assert text_out.sequence.shape == (2, 6, 32) and not text_out.region_mask.any()
    image_out = model({k: batch[k] for k in ("region_feat", "region_pos", "region_mask")})
    assert image_out.sequence.shape == (2, 5, 32) and image_out.text_len == 0
    assert not image_out.word_mask.any()
    t, i = model.embed_text(batch), model.embed_image(batch)
    assert t.shape == i.shape == (2, 16)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2)) and torch.allclose(i.norm(dim=-1), torch.ones(2))
    assert model.itc_logits(t, i).shape == (2, 2)


def test_image_tokens_reuse_and_broadcast():
    model = tiny()
    texts = text_batch([4, 6, 5])
    pixels = torch.randn(1, 3, 96, 96)
    tokens = model.encode_image(dict(pixels=pixels))
    scores = model.score(texts, image_tokens=tokens)  # one image against three texts
    for row in range(3):
        single = {k: v[row:row + 1] for k, v in texts.items()}
        assert torch.allclose(model.score(dict(single, pixels=pixels))[0], scores[row], atol=1e-5)


# ---- transformer ------------------------------------------------------------------------------------
def test_sdpa_and_explicit_attention_agree():
    model = tiny(num_layers=3, **FEATURES)
    batch = dict(text_batch([4, 7, 6]), **feature_batch([2, 5, 4]))
    fast = model(batch, attn_logit_layers=[])
    explicit = model(batch, attn_logit_layers=[0, 1, 2])
    assert fast.attn_logits == {} and sorted(explicit.attn_logits) == [0, 1, 2]
    assert torch.allclose(fast.sequence, explicit.sequence, atol=1e-5)
    assert explicit.attn_logits[2].shape == (3, 4, 12, 12)
    assert sorted(model(batch).attn_logits) == [2]  # config default [-1]


def test_pre_norm_layers_add_to_an_unnormalised_residual_stream():
    model = tiny(num_layers=1, norm="pre", **FEATURES)
    batch = dict(text_batch([4, 6]), **feature_batch([3, 5]))
    captured = {}
    layer = model.encoder.layers[0]
    layer.register_forward_pre_hook(lambda mod, args: captured.update(x=args[0], mask=args[1]))
    out = model(batch, attn_logit_layers=[])
    x, mask = captured["x"], captured["mask"]
    ctx, _ = layer.attention(layer.attn_norm(x), mask, False)
    x = x + layer.attn_out(ctx)
    x = x + layer.ffn_out(torch.nn.functional.gelu(layer.ffn_in(layer.ffn_norm(x))))
    assert torch.allclose(out.sequence, model.encoder.final_norm(x), atol=1e-5)
    explicit = model(batch, attn_logit_layers=[0])
    assert torch.allclose(explicit.sequence, out.sequence, atol=1e-5)
    # post-LN (UNITER's layout) has no final norm: its state dict keeps UNITER's keys
    assert "encoder.final_norm.weight" in model.state_dict()
    assert not any("final_norm" in k for k in tiny(**FEATURES).state_dict())


def test_fan_in_init_scales_linear_layers_and_keeps_the_embeddings_small():
    hidden, ffn = 128, 512
    model = tiny(hidden_size=hidden, intermediate_size=ffn, vocab_size=400, linear_init="fan_in", init_std=0.02)
    layer = model.encoder.layers[0]
    assert layer.attention.query.weight.std().item() == pytest.approx(hidden ** -0.5, rel=0.05)
    assert layer.ffn_out.weight.std().item() == pytest.approx(ffn ** -0.5, rel=0.05)
    assert float(layer.ffn_out.bias.abs().max()) == 0.0
    # the MLM decoder is the word-embedding table: it keeps init_std, not the decoder's fan-in scale
    assert model.embeddings.word_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.embeddings.position_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.1)
    normal = tiny(hidden_size=hidden, intermediate_size=ffn, vocab_size=400, init_std=0.02)
    assert normal.encoder.layers[0].attention.query.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_logits_are_scaled_query_key_products():
    model = tiny(num_layers=1, **FEATURES)
    batch = dict(text_batch([4, 6]), **feature_batch([3, 5]))
    captured = {}
    model.encoder.layers[0].register_forward_pre_hook(lambda mod, args: captured.update(x=args[0]))
    logits = model(batch, attn_logit_layers=[0]).attn_logits[0]
    attn = model.encoder.layers[0].attention
    q = attn.query(captured["x"]).view(2, 11, 4, 8).transpose(1, 2)
    k = attn.key(captured["x"]).view(2, 11, 4, 8).transpose(1, 2)
    assert torch.allclose(logits, q @ k.transpose(-1, -2) / 8 ** 0.5, atol=1e-5)


def test_padding_does_not_change_scores():
    model = tiny(**FEATURES)
    text, regions = text_batch([4, 6]), feature_batch([3, 5])
    compact = model.score(dict(text, **regions))
    padded_text = text_batch([4, 6], width=11)
    padded_regions = {k: torch.cat([v, torch.zeros_like(v[:, :4])], 1) for k, v in regions.items()}
    padded_regions["region_feat"][:, 5:] = 7.0  # garbage under padding must not matter
    assert torch.allclose(model.score(dict(padded_text, **padded_regions)), compact, atol=1e-5)
    first = dict({k: v[:1, :4] for k, v in text.items()}, **{k: v[:1, :3] for k, v in regions.items()})
    alone = model.score(first)
    assert torch.allclose(alone, compact[:1], atol=1e-5)


def test_heads_and_rank_init():
    model = tiny(**FEATURES)
    batch = dict(text_batch([4, 6]), **feature_batch([3, 5]))
    assert model.itm_logits(batch).shape == (2, 2)
    model.init_rank_from_itm()
    assert torch.allclose(model.score(batch), model.itm_logits(batch)[:, 1], atol=1e-6)
    out = model(batch)
    positions = out.word_mask[:, :out.text_len]
    logits = model.mlm_logits(out.sequence, positions)
    assert logits.shape == (int(positions.sum()), VOCAB)
    assert model.mlm_head.decoder.weight is model.embeddings.word_embeddings.weight
    model.embeddings.word_embeddings.weight.grad = None
    logits.sum().backward()
    assert model.embeddings.word_embeddings.weight.grad is not None


def test_gradient_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    cfg = tiny(image=dict(image_size=64)).config
    plain = models.RetrievalModel(cfg).train()
    ckpt = models.RetrievalModel(ModelConfig.from_dict(dict(cfg.to_dict(), grad_checkpointing=True))).train()
    assert ckpt.encoder.grad_checkpointing and ckpt.image_encoder.backbone.grad_checkpointing
    ckpt.load_state_dict(plain.state_dict())
    batch = dict(text_batch([4, 6]), pixels=torch.randn(2, 3, 64, 64))
    grads = []
    for model in (plain, ckpt):
        out = model(batch)
        (model.rank_head(out.pooled).sum() + out.attn_logits[1].square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(name.startswith("image_encoder.backbone.blocks") for name in grads[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_frozen_backbone_gets_no_grads_and_stays_in_eval():
    model = tiny(image=dict(backbone="test_resnet", trainable=False)).train()
    assert not model.image_encoder.backbone.training and model.encoder.training
    batch = dict(text_batch([4, 6]), pixels=torch.randn(2, 3, 96, 96))
    model.score(batch).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.image_encoder.backbone.parameters())
    assert model.img_embeddings.img_linear.weight.grad is not None


def test_trainable_backbone_gets_grads():
    model = tiny().train()
    model.score(dict(text_batch([4, 6]), pixels=torch.randn(2, 3, 96, 96))).sum().backward()
    assert all(p.grad is not None for p in model.image_encoder.backbone.parameters() if p.requires_grad)


# ---- persistence and configs -------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    model = tiny()
    batch = dict(text_batch([4, 6]), pixels=torch.randn(2, 3, 96, 96))
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == model.config.to_dict()
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embeddings.word_embeddings.weight" in keys and "mlm_head.decoder.weight" not in keys
    loaded = models.RetrievalModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.mlm_head.decoder.weight is loaded.embeddings.word_embeddings.weight
    assert torch.equal(loaded.score(batch), model.score(batch))


def test_backbone_weights_from_local_file(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", num_classes=0)
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model = tiny(image=dict(backbone="test_resnet", backbone_file=str(tmp_path / "backbone.pth")))
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.image_encoder.backbone.state_dict()[name], tensor), name


def test_presets_and_overrides():
    assert models.list_presets() == ["base", "large", "small", "tiny"]
    for name in models.list_presets():
        cfg = ModelConfig.from_dict(models.registry.preset_config(name))
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    base = ModelConfig.from_dict(models.registry.preset_config("base"))
    large = ModelConfig.from_dict(models.registry.preset_config("large"))
    assert (base.hidden_size, base.num_layers, base.num_heads, base.intermediate_size) == (768, 12, 12, 3072)
    assert (large.hidden_size, large.num_layers, large.num_heads,
            large.intermediate_size) == (1024, 24, 16, 4096)
    model = create_model("tiny", hidden_size=64, image=dict(mode="features", backbone=None, feat_dim=10))
    assert model.config.image == ImageEncoderConfig(mode="features", backbone=None, feat_dim=10)
    assert model.config.num_layers == 3 and model.config.hidden_size == 64
    assert create_model(model.config, num_layers=1).config.num_layers == 1
    assert create_model("tiny").config.image.backbone_kwargs == {"depth": 1}
    # kwargs belong to their backbone: a new backbone starts without the preset's
    assert create_model("tiny", image=dict(backbone="test_resnet")).config.image.backbone_kwargs == {}


@pytest.mark.parametrize("overrides,message", [
    (dict(num_heads=5), "not a multiple"),
    (dict(colour=1), "unknown field"),
    (dict(image=dict(mode="grid")), "model.image.mode"),
    (dict(image=dict(mode="features", backbone=None)), "feat_dim"),
    (dict(attn_logit_layers=[3]), "attn_logit_layers"),
    (dict(norm="middle"), "model.norm='middle': give one of post, pre"),
    (dict(linear_init="xavier"), "model.linear_init='xavier': give one of normal, fan_in"),
    (dict(image=dict(backbone="no_such_net")), "not a timm model"),
    (dict(image=dict(backbone="test_resnet", backbone_kwargs=dict(depth=1))), "test_resnet rejects them"),
    (dict(image=dict(backbone_kwargs=dict(img_size=32))), "use backbone_file / image_size"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        create_model("tiny", **overrides)
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("huge")
