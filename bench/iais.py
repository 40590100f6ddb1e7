"""IAIS cost, measured side by side in one run.

(1) One fine-tuning forward+backward of a 2-layer base-width model (768 hidden, 12 heads) on 32 positive pairs
    of 20 words and 36 precomputed 2048-d regions, without IAIS (SDPA everywhere) and with IAIS (singular, L,
    on the last layer, whose attention is then computed explicitly): `iais_step_ratio` = with / without.
(2) `iais_loss` (forward+backward) against a straightforward per-sample loop of the same maths on that
    layer's logits: `iais_vs_loop_speedup` = loop / batched.
Timings are medians of interleaved repeats, with torch using every core this process may run on. Last line:
RESULT iais_step_ratio=<r> iais_vs_loop_speedup=<s>.

    .venv/bin/python bench/iais.py [--repeats 5] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import create_model, iais_loss  # noqa: E402

PAIRS, WORDS, REGIONS, FEAT_DIM = 32, 20, 36, 2048
ALIGNMENT, SIDE = "singular", "L"


def make_batch(vocab_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    text_len = WORDS + 2
    ids = torch.randint(5, vocab_size, (PAIRS, text_len), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    boxes = torch.rand(PAIRS, REGIONS, 2, 2, generator=gen).sort(dim=2).values
    x1, y1, x2, y2 = boxes[..., 0, 0], boxes[..., 0, 1], boxes[..., 1, 0], boxes[..., 1, 1]
    w, h = x2 - x1, y2 - y1
    return {
        "input_ids": ids,
        "text_mask": torch.ones(PAIRS, text_len, dtype=torch.bool),
        "region_feat": torch.randn(PAIRS, REGIONS, FEAT_DIM, generator=gen).relu(),
        "region_pos": torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1),
        "region_mask": torch.ones(PAIRS, REGIONS, dtype=torch.bool),
    }


def finetune_step(model, batch, with_iais: bool) -> None:
    out = model(batch, attn_logit_layers=[-1] if with_iais else [])
    loss = F.softplus(-model.rank_head(out.pooled)).mean()
    if with_iais:
        (logits,) = out.attn_logits.values()
        loss = loss + 0.1 * iais_loss(logits, out.word_mask, out.region_mask, ALIGNMENT, SIDE)
    model.zero_grad(set_to_none=True)
    loss.backward()


def loop_iais_loss(scores, word_mask, region_mask):
    """The same maths one sample at a time: block softmaxes, argmax alignment, symmetric KL."""
    total = scores.new_zeros(())
    for b in range(scores.shape[0]):
        a = scores[b].float()
        w, r = word_mask[b].nonzero().flatten(), region_mask[b].nonzero().flatten()
        ll = torch.softmax(a[:, w][:, :, w], -1).mean(0)
        vv = torch.softmax(a[:, r][:, :, r], -1).mean(0)
        lv = torch.softmax(a[:, w][:, :, r], -1).mean(0)
        idx = lv.argmax(-1)
        pseudo = torch.softmax(vv[idx][:, idx], -1)
        kl = (ll * (ll.log() - pseudo.log())).sum(-1) + (pseudo * (pseudo.log() - ll.log())).sum(-1)
        total = total + kl.mean()
    return total / scores.shape[0]


def timed(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        timed(fn, device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    try:
        run()
    except Exception:  # benchmarks always exit 0; the traceback says what broke
        traceback.print_exc()
        print("RESULT iais_step_ratio=nan iais_vs_loop_speedup=nan")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    model = create_model("base", num_layers=2, image=dict(mode="features", feat_dim=FEAT_DIM, backbone=None))
    model.to(device).train()
    batch = {key: value.to(device) for key, value in make_batch(model.config.vocab_size, gen).items()}
    steps = median_interleaved({"without": lambda: finetune_step(model, batch, False),
                                "with": lambda: finetune_step(model, batch, True)}, args.repeats, device)
    step_ratio = steps["with"] / steps["without"]
    print(f"finetune fwd+bwd on {device.type} (B={PAIRS}, N={WORDS + 2 + REGIONS}, 2 layers x 768, threads="
          f"{torch.get_num_threads()}): without IAIS {steps['without'] * 1e3:.1f} ms, with IAIS "
          f"{steps['with'] * 1e3:.1f} ms, ratio {step_ratio:.3f}")

    with torch.no_grad():
        out = model(batch, attn_logit_layers=[-1])
    scores = next(iter(out.attn_logits.values())).detach()
    word_mask, region_mask = out.word_mask, out.region_mask

    def batched():
        s = scores.clone().requires_grad_(True)
        iais_loss(s, word_mask, region_mask, ALIGNMENT, SIDE).backward()

    def looped():
        s = scores.clone().requires_grad_(True)
        loop_iais_loss(s, word_mask, region_mask).backward()

    with torch.no_grad():
        batched_value = iais_loss(scores, word_mask, region_mask, ALIGNMENT, SIDE)
        diff = float((batched_value - loop_iais_loss(scores, word_mask, region_mask)).abs())
    loss_times = median_interleaved({"batched": batched, "loop": looped}, max(args.repeats, 15), device)
    speedup = loss_times["loop"] / loss_times["batched"]
    print(f"iais_loss fwd+bwd on [{', '.join(map(str, scores.shape))}]: batched "
          f"{loss_times['batched'] * 1e3:.2f} ms, per-sample loop {loss_times['loop'] * 1e3:.2f} ms, "
          f"speedup {speedup:.1f} (|difference| {diff:.2e})")
    print(f"RESULT iais_step_ratio={step_ratio:.3f} iais_vs_loop_speedup={speedup:.1f}")


if __name__ == "__main__":
    main()
