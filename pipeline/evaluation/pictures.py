"""PNG pictures of an evaluation: attention vs pseudo attention, and top-5 retrieved items.

The attention and pseudo maps come from ``models.iais.attention_maps`` (DESIGN.md "IAIS and ISD"), the
same maths as the metrics.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.iais import attention_maps  # noqa: E402
from pipeline import distributed as ddp  # noqa: E402
from pipeline.data.eval_split import EvalData  # noqa: E402
from pipeline.evaluation.retrieval import images_for  # noqa: E402

TOP = 5


# ----------------------------------------------------------------------------- labels and images

def token_labels(data: EvalData, caption: int) -> list[str]:
    """One label per word token (CLS/SEP excluded): its whitespace word, '+' marking continuation pieces."""
    ids = data.caption_ids[caption]
    if data.token_words is None or caption >= len(data.captions):
        return [str(i) for i in ids[1:-1]]
    words = data.captions[caption].split()
    labels, previous = [], None
    for w in data.token_words[caption][1:-1]:
        text = words[w] if 0 <= w < len(words) else "?"
        labels.append(text if w != previous else "+")
        previous = w
    return labels


def thumbnail(data: EvalData, image: int) -> np.ndarray | None:
    """An HxWx3 array in [0, 1] for display, or None (precomputed-feature splits have no pixels)."""
    if "pixels" not in data.images:
        return None
    x = data.images["pixels"][image].float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)
    return x.permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- figures

def plot_attention(mats: dict[str, torch.Tensor], words: list[str], caption: str, alignment: str,
                   path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.5))
    n_regions = mats["S_VV"].shape[0]
    region_ticks = [str(i) for i in range(n_regions)]
    for ax, key in zip(axes.flat, ("S_LL", "P_L", "S_VV", "P_V")):
        pair = ("S_LL", "P_L") if key in ("S_LL", "P_L") else ("S_VV", "P_V")
        vmax = max(float(mats[k].max()) for k in pair)  # one colour scale per attention/pseudo pair
        image = ax.imshow(mats[key].cpu().numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ticks = words if key in ("S_LL", "P_L") else region_ticks
        if len(ticks) <= 40:
            ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=7)
            ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_title({"S_LL": "S_LL (words)", "P_L": f"pseudo P_L ({alignment})",
                      "S_VV": "S_VV (image tokens)", "P_V": f"pseudo P_V ({alignment})"}[key], fontsize=9)
    fig.suptitle(caption[:120], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_text_query(data: EvalData, scores: torch.Tensor, caption: int, path: Path) -> None:
    top = scores[caption].topk(min(TOP, scores.shape[1])).indices.tolist()
    truth = int(data.text_to_image[caption])
    fig, axes = plt.subplots(1, len(top), figsize=(2.4 * len(top), 2.9))
    for rank, (ax, img) in enumerate(zip(np.atleast_1d(axes), top)):
        thumb = thumbnail(data, img)
        if thumb is not None:
            ax.imshow(thumb)
        ax.set_xticks([])
        ax.set_yticks([])
        ok = img == truth
        ax.set_title(f"#{rank + 1} {scores[caption, img]:.2f}" + (" (match)" if ok else ""),
                     fontsize=8, color="green" if ok else "black")
        for spine in ax.spines.values():
            spine.set_edgecolor("green" if ok else "grey")
            spine.set_linewidth(3 if ok else 1)
    fig.suptitle(f"query: {data.captions[caption][:100]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_image_query(data: EvalData, scores: torch.Tensor, image: int, path: Path) -> None:
    column = scores[:, image]
    top = column.topk(min(TOP, column.numel())).indices.tolist()
    fig, (ax_img, ax_txt) = plt.subplots(1, 2, figsize=(9, 2.6), gridspec_kw={"width_ratios": [1, 3]})
    thumb = thumbnail(data, image)
    if thumb is not None:
        ax_img.imshow(thumb)
    ax_img.set_title(f"query image {data.image_keys[image]}", fontsize=8)
    ax_img.axis("off")
    ax_txt.axis("off")
    for rank, cap in enumerate(top):
        ok = int(data.text_to_image[cap]) == image
        ax_txt.text(0.0, 0.9 - 0.19 * rank, f"#{rank + 1} {column[cap]:.2f}  {data.captions[cap][:90]}",
                    fontsize=8, color="green" if ok else "black", transform=ax_txt.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point

def write_pictures(model, data: EvalData, cfg, out_dir, scores: torch.Tensor | None) -> list[Path]:
    """Collective (the attention forward runs on every rank, for ZeRO-3); rank 0 writes the PNGs."""
    out_dir = Path(out_dir)
    n = min(cfg.pictures, data.n_texts)
    if n == 0:
        return []
    device = next(model.parameters()).device
    captions = torch.linspace(0, data.n_texts - 1, n).round().long().unique()
    layer = model.config.logit_layer_indices([cfg.isd_layer])[0]
    batch = data.text_inputs(captions, device)
    tokens = model.encode_image(images_for(model, data, data.text_to_image[captions]))
    out = model.forward(batch, image_tokens=tokens, attn_logit_layers=[layer])
    if ddp.rank() != 0:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    alignment = cfg.isd_alignments[0] if cfg.isd_alignments else "singular"
    written: list[Path] = []
    for row, cap in enumerate(captions.tolist()):
        words = out.word_mask[row].nonzero().flatten()
        regions = out.region_mask[row].nonzero().flatten()
        mats = attention_maps(out.attn_logits[layer][row], words, regions, alignment)
        labels = token_labels(data, cap)[: words.numel()]
        path = out_dir / f"attention_{row:02d}.png"
        plot_attention(mats, labels, data.captions[cap] if cap < len(data.captions) else "", alignment, path)
        written.append(path)
    if scores is not None and data.captions:
        for row, cap in enumerate(captions.tolist()):
            path = out_dir / f"top{TOP}_text_query_{row:02d}.png"
            plot_text_query(data, scores, cap, path)
            written.append(path)
            path = out_dir / f"top{TOP}_image_query_{row:02d}.png"
            plot_image_query(data, scores, int(data.text_to_image[cap]), path)
            written.append(path)
    return written
