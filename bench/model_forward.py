"""RetrievalModel forward/step timings, measured side by side in one run.

CPU: the tiny preset (batch 32, 96x96). With CUDA also the base preset (batch 32, 224x224, bf16 autocast).
Ratios: explicit attention on the last layer (logits returned) vs SDPA everywhere; a training step with
activation checkpointing vs without. Usage: python bench/model_forward.py [--threads 1] [--repeats 10]
"""
from __future__ import annotations

import argparse
import contextlib
import traceback

import torch
from timing import call_seconds  # bench/timing.py

import models


def make_batch(cfg: models.ModelConfig, batch: int, text_len: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=g)
    ids[torch.arange(text_len)[None] >= lengths[:, None]] = 0
    size = cfg.image.image_size
    out = dict(input_ids=ids, text_mask=ids != 0, pixels=torch.randn(batch, 3, size, size, generator=g))
    return {k: v.to(device) for k, v in out.items()}


def timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of fn() after two warm-up calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = call_seconds(fn, repeats, sync, warmup=2)
    return sorted(times)[len(times) // 2] * 1000


def measure(preset: str, device: str, batch_size: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = models.create_model(preset, dropout=0.0).to(device)
    batch = make_batch(model.config, batch_size, 20, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    res: dict[str, float] = {}
    model.eval()
    with torch.no_grad(), amp:
        tokens = model.encode_image(batch)
        res["encode_image_ms"] = timed(lambda: model.encode_image(batch), device, repeats)
        res["score_ms"] = timed(lambda: model.score(batch), device, repeats)
        res["score_reuse_tokens_ms"] = timed(lambda: model.score(batch, image_tokens=tokens), device, repeats)
        res["forward_logits_ms"] = timed(lambda: model(batch, image_tokens=tokens), device, repeats)
        res["forward_sdpa_ms"] = timed(lambda: model(batch, image_tokens=tokens, attn_logit_layers=[]),
                                       device, repeats)
    model.train()

    def step():
        with amp:
            out = model(batch)
            logits = out.attn_logits[model.config.num_layers - 1]
            loss = model.rank_head(out.pooled).float().sum() + logits.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res[f"train_step{'_ckpt' if ckpt else ''}_ms"] = timed(step, device, repeats)
        if device == "cuda":
            res[f"peak_mem{'_ckpt' if ckpt else ''}_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [("tiny", "cpu", 32)]
    if torch.cuda.is_available():
        runs += [("tiny", "cuda", 32), ("base", "cuda", 32)]
    result = {}
    for preset, device, batch_size in runs:
        res = measure(preset, device, batch_size, args.repeats)
        values = ", ".join(f"{k}={v:.3g}" for k, v in res.items())
        print(f"{preset} on {device}, batch {batch_size}: {values}")
        logit_ratio = res["forward_logits_ms"] / res["forward_sdpa_ms"]
        ckpt_ratio = res["train_step_ckpt_ms"] / res["train_step_ms"]
        print(f"  last-layer logits vs SDPA forward: {logit_ratio:.2f}x; "
              f"checkpointed vs plain step: {ckpt_ratio:.2f}x")
        key = f"{preset}_{device}"
        result[f"{key}_score_ms"] = res["score_ms"]
        result[f"{key}_logit_layer_ratio"] = logit_ratio
        result[f"{key}_ckpt_step_ratio"] = ckpt_ratio
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in result.items()))


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a benchmark reports and exits 0
        traceback.print_exc()
        print(f"RESULT error={type(exc).__name__}")
