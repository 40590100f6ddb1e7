"""Import UNITER / IAIS checkpoints (public UNITER state-dict layout) into a features-mode RetrievalModel."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from .config import ConfigError, ImageEncoderConfig, ModelConfig
from .retrieval import RetrievalModel

HEAD_DIM = 64  # UNITER base/large both use 64-d heads

# (UNITER name pattern, our name template); N = layer index
_RULES = [
    (r"uniter\.embeddings\.word_embeddings\.weight", "embeddings.word_embeddings.weight"),
    (r"uniter\.embeddings\.position_embeddings\.weight", "embeddings.position_embeddings.weight"),
    (r"uniter\.embeddings\.token_type_embeddings\.weight", "embeddings.token_type_embeddings.weight"),
    (r"uniter\.embeddings\.LayerNorm\.(weight|bias)", r"embeddings.norm.\1"),
    (r"uniter\.img_embeddings\.img_linear\.(weight|bias)", r"img_embeddings.img_linear.\1"),
    (r"uniter\.img_embeddings\.img_layer_norm\.(weight|bias)", r"img_embeddings.img_norm.\1"),
    (r"uniter\.img_embeddings\.pos_linear\.(weight|bias)", r"img_embeddings.pos_linear.\1"),
    (r"uniter\.img_embeddings\.pos_layer_norm\.(weight|bias)", r"img_embeddings.pos_norm.\1"),
    (r"uniter\.img_embeddings\.LayerNorm\.(weight|bias)", r"img_embeddings.norm.\1"),
    (r"uniter\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
     r"encoder.layers.\1.attention.\2.\3"),
    (r"uniter\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)",
     r"encoder.layers.\1.attn_out.\2"),
    (r"uniter\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)",
     r"encoder.layers.\1.attn_norm.\2"),
    (r"uniter\.encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"encoder.layers.\1.ffn_in.\2"),
    (r"uniter\.encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"encoder.layers.\1.ffn_out.\2"),
    (r"uniter\.encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"encoder.layers.\1.ffn_norm.\2"),
    (r"uniter\.pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
    (r"itm_output\.(weight|bias)", r"itm_head.\1"),
    (r"rank_output\.(weight|bias)", r"rank_head.\1"),
    (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"mlm_head.dense.\1"),
    (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.norm.\1"),
    (r"cls\.predictions\.bias", "mlm_head.bias"),
]
_RULES = [(re.compile(pattern + "$"), target) for pattern, target in _RULES]
# pretraining-only parts we have no use for (MRM heads; the decoder is tied to the word embeddings)
_IGNORED = re.compile(r"(cls\.predictions\.decoder\.|feat_regress\.|"
                      r"region_classifier\.|.*\.num_batches_tracked$)")


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops DDP `module.` prefixes and renames old LayerNorm gamma/beta to weight/bias (as UNITER does)."""
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        out[key] = value
    return out


def _read(path_or_state_dict) -> dict[str, torch.Tensor]:
    """The state dict of a UNITER checkpoint: a dict as given, or a file read without unpickling code
    (safetensors, or torch.load(weights_only=True): tensors and plain values only)."""
    state = path_or_state_dict if isinstance(path_or_state_dict, dict) else _read_file(Path(path_or_state_dict))
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"not a UNITER checkpoint: it holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _read_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"UNITER checkpoint {path} does not exist: give the path of a .pt file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        raise ConfigError(f"{path}: refused to load: it contains {found.group(1) if found else 'an object'} "
                          "which could run code; only tensors and plain values are loaded") from None
    except (EOFError, RuntimeError, ValueError, OSError, SafetensorError) as exc:   # truncated or corrupt
        raise ConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'empty'})") from None


def uniter_config(state: dict[str, torch.Tensor], img_dim: int) -> ModelConfig:
    """Model size from the tensor shapes of a (normalised) UNITER state dict."""
    try:
        vocab, hidden = state["uniter.embeddings.word_embeddings.weight"].shape
        max_len = state["uniter.embeddings.position_embeddings.weight"].shape[0]
        found_dim = state["uniter.img_embeddings.img_linear.weight"].shape[1]
        intermediate = state["uniter.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise ConfigError(f"not a UNITER checkpoint: missing {exc.args[0]}") from exc
    if found_dim != img_dim:
        raise ConfigError(f"UNITER checkpoint has {found_dim}-d image features but img_dim={img_dim}: "
                          f"pass img_dim={found_dim}")
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"uniter\.encoder\.layer\.(\d+)\.", k)))
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=hidden // HEAD_DIM,
                       intermediate_size=intermediate, max_text_len=max_len, dropout=0.1,
                       image=ImageEncoderConfig(mode="features", backbone=None, feat_dim=img_dim),
                       itc_dim=256)


def map_uniter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNITER names -> RetrievalModel names; unknown keys are an error, MRM-only keys are dropped."""
    mapped, unknown = {}, []
    for key, value in state.items():
        if key == "uniter.img_embeddings.mask_embedding.weight":   # row 0 is the "not masked" zero row
            mapped["img_embeddings.mask_feature"] = value[1]
            continue
        for pattern, target in _RULES:
            if pattern.match(key):
                mapped[pattern.sub(target, key)] = value
                break
        else:
            if not _IGNORED.match(key):
                unknown.append(key)
    if unknown:
        raise ConfigError(f"UNITER checkpoint has {len(unknown)} unexpected key(s), e.g. {unknown[:3]}")
    return mapped


def load_uniter_checkpoint(path_or_state_dict, img_dim: int = 2048) -> RetrievalModel:
    """Features-mode RetrievalModel with the UNITER weights.

    Without rank_output the rank head starts from the ITM match row; the ITC projections, the grounding head
    (UNITER has none) and the MLM head (for fine-tuned checkpoints that have none) stay freshly initialised.
    """
    state = _normalise_keys(_read(path_or_state_dict))
    model = RetrievalModel(uniter_config(state, img_dim))
    mapped = map_uniter_state(state)
    result = model.load_state_dict(mapped, strict=False)
    fresh = ("itc.", "mlm_head.", "mrfr_head.", "itm_head.", "rank_head.", "grounding_head.")
    backbone_keys = [k for k in result.missing_keys if not k.startswith(fresh)
                     and k != "img_embeddings.mask_feature"]
    if backbone_keys:
        raise ConfigError(f"UNITER checkpoint lacks {len(backbone_keys)} weight(s), e.g. {backbone_keys[:3]}")
    if "rank_head.weight" not in mapped and "itm_head.weight" in mapped:
        model.init_rank_from_itm()
    return model
