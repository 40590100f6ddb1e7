#!/usr/bin/env python
"""Model FLOPs utilisation (MFU) of the real fine-tuning step, its phase split, and a bare-encoder reference.

Drives the step exactly as ``pipeline.train.loop.optimizer_step`` does (grad_accum 1): the config from
``runtime.prepare("finetune", --config, overrides, <ds json>)``, a real DeepSpeed engine in one process
(world size 1, ZeRO ``--zero``, torch AdamW), the real synthetic shards, BatchStream, CandidatePool (filled as
a fresh run fills it) and FinetuneStep. Each step is split with perf_counter sections (synchronised on CUDA)
around ``next(stream)`` (loader wait), ``pool.add`` + ``to_device`` (data prep), the step function, whose
``mine`` method, trained forward (``step_fn.forward``), ``iais_loss`` and ``itc_loss`` are wrapped at run time
(nothing in pipeline/ is edited), ``engine.backward`` and ``engine.step`` (optimizer).
trained fwd/bwd = (step function - mining) + backward: building the trained pairs, encoding their images,
the transformer forward and every loss (rank, swap, grounding, IAIS, ITC), then the backward.

FLOPs, counted analytically (a multiply-add is 2 FLOPs; a trained pass costs 3x its forward: backward = 2x).
H hidden, L layers, I intermediate, heads h, D image feature dim, M image tokens per image, itc = itc_dim:
    F_layer(N)   = 2N(4H^2 + 2HI) + 4N^2 H            Q,K,V,O projections, FFN, Q K^T and A V (dense, padded N)
    F_pair(T, M) = L F_layer(T + M) + 2M(DH + 7H) + 2H^2 + 2H     + image embedding, pooler, rank head
    F_img        backbone per image; a timm ViT: 2P(3p^2)D_b + depth (2S(4D_b^2 + 2D_b I_b) + 4S^2 D_b),
                 P patches of p x p, S = P + prefix tokens (other backbones: torch's FlopCounterMode, once)
Per step, from what the step reports (pairs_scored, pairs_trained, images_encoded; b anchors, text widths
T_b of the batch, T_pool of the pool's texts, T_tr of the trained pairs, all as padded):
    mining   = images_mined F_img + pairs_scored F_pair(T_b or T_pool, M)   (text- / image-anchored groups)
    trained  = 3 (pairs_trained F_pair(T_tr, M) + (images_encoded - images_mined) F_img g)   g = 1 if the
               backbone trains, else 1/3 (its forward only)
    ITC      = 3 (b F_img g + b L F_layer(T_b) + b (L F_layer(M) + 2M(DH + 7H)) + 4 b H itc + 4 b^2 itc)
    IAIS     = per IAIS layer 6 b h (3 (w^2 + r^2) + w r), w = T_b - 2 words, r = M regions (softmax +
               head mean of the blocks, backward of the differentiated ones; its attention matmuls are in F_layer)
The grounding head and the other losses' elementwise work (< 0.1 %) are not counted. As a check the same
formulas are applied to the encoder / image-embedding / backbone calls observed by forward hooks.

The peak is a large square torch.matmul (2048^3 CPU, 8192^3 CUDA) at the run's dtype and thread count on the
same device, timed the same way; it is sampled (best of 3 / 20 calls) before the steps and after each measured
step, and the best sample is the peak (the median sample is printed too: on a machine shared with other jobs
it shows how much they took). The bare reference is a torch.nn.TransformerEncoder (post-LN, GELU, the model's
dropout) of the same width/depth/intermediate size on the first step's trained batch shape (pairs_trained x
(T_tr + M) tokens), trained with torch AdamW, one step after each measured step:
bare_mfu = 3 B L F_layer(N) / its mean step time / peak. MFU = counted FLOPs per step / mean step time / peak.

    .venv/bin/python bench/train_step.py [--preset small] [--device auto] [--steps 4] [--quick] [--profile]
Last line: RESULT preset=<name> device=<cpu|cuda> dtype=<d> mfu=<r> mining_share=<f> loader_wait_share=<f>
step_s=<seconds> bare_mfu=<r>. Exits 0 whether or not a target is met (a failure prints the traceback and
nan values).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from launched import DEMO_CONFIG as DEFAULT_CONFIG, PRESET_SETS, RUN_SETS  # noqa: E402  (bench/launched.py)
from timing import call_seconds  # noqa: E402  (bench/timing.py)

PHASES = ("loader_wait", "data_prep", "mining", "trained_fwd", "backward", "optimizer")
NESTED = ("transformer_fwd", "iais", "itc")   # timed inside trained_fwd
RESULT_KEYS = ("mfu", "mining_share", "loader_wait_share", "step_s", "bare_mfu")


# ----------------------------------------------------------------------------- arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESET_SETS), default="small")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on cuda, else fp32")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage (default 2 cuda, 0 cpu)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps (default 4; --quick 2); even: the directions alternate by step")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1; --quick 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the cores this process may use)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="experiment config override (repeatable), applied after the preset's")
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats (~30 s on 2 CPU cores)")
    p.add_argument("--profile", action="store_true", help="after measuring, profile one more step: top ops")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    args.dtype = ("bf16" if args.device == "cuda" else "fp32") if args.dtype == "auto" else args.dtype
    if args.dtype == "bf16" and args.device == "cpu":
        p.error("--dtype bf16 needs --device cuda (the pipeline trains in fp32 on CPU)")
    args.zero = (2 if args.device == "cuda" else 0) if args.zero is None else args.zero
    args.steps = args.steps or (2 if args.quick else 4)
    args.warmup = (0 if args.quick else 1) if args.warmup is None else args.warmup
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return device


# ----------------------------------------------------------------------------- timing

class PhaseClock:
    """Seconds per named phase of the current step; CUDA is synchronised at every boundary."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"phase:{name}"):   # labels the --profile table
                yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    def take(self) -> dict[str, float]:
        """This step's seconds per phase; the clock starts the next step at zero."""
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds


def sync_of(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ----------------------------------------------------------------------------- FLOP formulas

def layer_flops(n: float, h: int, inter: int) -> float:
    """One post-LN BERT layer's forward on a sequence of n tokens: projections, FFN, QK^T and AV."""
    return 2 * n * (4 * h * h + 2 * h * inter) + 4 * n * n * h


def image_embed_flops(m: float, h: int, feat_dim: int) -> float:
    return 2 * m * (feat_dim * h + 7 * h)


class ModelShape:
    """The sizes the FLOP formulas need, read from the model config and its backbone."""

    def __init__(self, module, image_tokens: int):
        c = module.config
        self.h, self.layers, self.inter, self.heads, self.itc = (c.hidden_size, c.num_layers, c.intermediate_size,
                                                                 c.num_heads, c.itc_dim)
        self.feat_dim, self.m = module.image_encoder.feat_dim, image_tokens
        self.dropout = c.dropout
        backbone = module.image_encoder.backbone
        self.img = 0.0 if backbone is None else backbone_flops(backbone, c.image.image_size)
        # a frozen backbone runs forward only: its "3x" becomes 1x
        self.img_grad = 3.0 if backbone is not None and c.image.trainable else 1.0

    def encoder(self, n: float) -> float:
        return self.layers * layer_flops(n, self.h, self.inter)

    def pair(self, text_len: float) -> float:
        h = self.h
        return (self.encoder(text_len + self.m) + image_embed_flops(self.m, h, self.feat_dim)
                + 2 * h * h + 2 * h)


def backbone_flops(backbone, image_size: int) -> float:
    """Forward FLOPs of one image through the backbone: analytic for a timm ViT, else FlopCounterMode."""
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(backbone, VisionTransformer):
        pe = backbone.patch_embed
        d, (gh, gw) = backbone.embed_dim, pe.grid_size
        p, patches = pe.patch_size[0] * pe.patch_size[1], gh * gw
        seq = patches + backbone.num_prefix_tokens
        mlp = backbone.blocks[0].mlp.fc1.out_features
        blocks = len(backbone.blocks) * (2 * seq * (4 * d * d + 2 * d * mlp) + 4 * seq * seq * d)
        return 2 * patches * pe.proj.in_channels * p * d + blocks
    from torch.utils.flop_counter import FlopCounterMode
    param = next(backbone.parameters())
    pixels = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(pixels)
    return float(counter.get_total_flops())


def step_flops(shape: ModelShape, rec: dict, cfg) -> dict[str, float]:
    """Model FLOPs of one step by part, from the step's reports and widths (module docstring)."""
    ft, b = cfg.finetune, rec["b"]
    mine_text_len = rec["text_len"] if rec["text_anchored"] else rec["pool_text_len"]
    if rec["text_anchored"] and rec["image_anchored"]:
        mine_pairs = rec["pairs_scored"] / 2 * (shape.pair(rec["text_len"]) + shape.pair(rec["pool_text_len"]))
    else:
        mine_pairs = rec["pairs_scored"] * shape.pair(mine_text_len)
    parts = {"mining": rec["images_mined"] * shape.img + mine_pairs}
    trained_images = rec["images_encoded"] - rec["images_mined"]
    parts["trained"] = 3 * rec["pairs_trained"] * shape.pair(rec["trained_text_len"]) \
        + shape.img_grad * trained_images * shape.img
    parts["itc"] = 0.0
    if ft.itc_weight > 0:
        h, m = shape.h, shape.m
        passes = shape.encoder(rec["text_len"]) + shape.encoder(m) + image_embed_flops(m, h, shape.feat_dim)
        parts["itc"] = shape.img_grad * b * shape.img + 3 * (b * passes + 4 * b * h * shape.itc
                                                             + 4 * b * b * shape.itc)
    parts["iais"] = 0.0
    if ft.iais.alignment != "none" and ft.iais.weight > 0:
        w, r = max(rec["text_len"] - 2, 0), shape.m
        parts["iais"] = len(ft.iais.layers) * 6 * b * shape.heads * (3 * (w * w + r * r) + w * r)
    return parts


class ObservedFlops:
    """The same formulas applied to every encoder / image-embedding / backbone / pooler call seen by hooks."""

    def __init__(self, module, shape: ModelShape):
        self.shape, self.total, self.handles = shape, 0.0, []
        targets = [(module.encoder, self._encoder), (module.img_embeddings, self._image_embed),
                   (module.pooler, self._pooler)]
        if module.image_encoder.backbone is not None:
            targets.append((module.image_encoder.backbone, self._backbone))
        for target, hook in targets:
            self.handles.append(target.register_forward_pre_hook(hook))

    @staticmethod
    def _factor() -> float:
        return 3.0 if torch.is_grad_enabled() else 1.0

    def _encoder(self, _module, args):
        x = args[0]
        self.total += self._factor() * x.shape[0] * self.shape.encoder(x.shape[1])

    def _image_embed(self, _module, args):
        feat = args[0]
        self.total += self._factor() * feat.shape[0] * image_embed_flops(feat.shape[1], self.shape.h,
                                                                         self.shape.feat_dim)

    def _pooler(self, _module, args):
        self.total += self._factor() * args[0].shape[0] * 2 * self.shape.h ** 2

    def _backbone(self, _module, args):
        self.total += self._factor() * args[0].shape[0] * self.shape.img

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------- peak and bare reference

def torch_dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bf16" else torch.float32


def matmul_peak(device: torch.device, dtype: str) -> tuple[float, int]:
    """Best FLOP/s of 3 (CPU) / 20 (CUDA) n x n x n torch.matmul at the run's dtype and threads, and n."""
    n = 8192 if device.type == "cuda" else 2048
    repeats = 3 if device.type == "cpu" else 20
    a = torch.randn(n, n, device=device, dtype=torch_dtype(dtype))
    b = torch.randn(n, n, device=device, dtype=torch_dtype(dtype))
    out = torch.empty(n, n, device=device, dtype=torch_dtype(dtype))
    times = call_seconds(lambda: torch.matmul(a, b, out=out), repeats, sync_of(device))
    return 2 * n ** 3 / min(times), n


class BareEncoder:
    """A torch.nn.TransformerEncoder training step (forward, mean loss, backward, torch AdamW) of the model's
    width/depth/intermediate size and dropout on a fixed [batch, seq, H] input."""

    def __init__(self, shape: ModelShape, batch: int, seq: int, device: torch.device, dtype: str):
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(shape.h, shape.heads, shape.inter, dropout=shape.dropout,
                                                 activation="gelu", batch_first=True, layer_norm_eps=1e-12)
        self.encoder = torch.nn.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)
        self.encoder.to(device).train()
        self.optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=1e-4)
        self.x = torch.randn(batch, seq, shape.h, device=device)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        self.sync = sync_of(device)
        self.batch, self.seq = batch, seq
        self.flops = 3 * batch * shape.encoder(seq)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp:
            loss = self.encoder(self.x).float().mean()
        loss.backward()
        self.optimizer.step()

    def seconds(self) -> float:
        """Wall seconds of one step, timed as the real step is."""
        self.sync()
        start = time.perf_counter()
        self.step()
        self.sync()
        return time.perf_counter() - start


# ----------------------------------------------------------------------------- the real step

def write_ds_config(zero: int, dtype: str, folder: Path) -> Path:
    """ds_configs/zero<stage>.json with torch AdamW (no fused op to compile) and the run's precision."""
    ds = json.loads((REPO / "ds_configs" / f"zero{zero}.json").read_text())
    ds.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = True
    ds["bf16"] = {"enabled": dtype == "bf16"}
    path = folder / f"ds_zero{zero}.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


def experiment_sets(args, run_dir: Path) -> list[str]:
    """train.steps stays the config's (the schedules' horizon): the benchmark runs its first steps."""
    return [*PRESET_SETS[args.preset], *RUN_SETS, f"run_dir={run_dir}", f"train.threads={args.threads}",
            *args.sets]


class RealStep:
    """The fine-tuning job's pieces (as FinetuneJob builds them) with the step's phases instrumented."""

    def __init__(self, args, folder: Path):
        from pipeline.config import split_path
        from pipeline.train import runtime as T
        from pipeline.train.build import build_model, ensure_data, ensure_tokenizer, loader_config
        from pipeline.train.finetune_step import FinetuneStep
        from pipeline.train.negatives import CandidatePool
        from pipeline.data.loader import BatchStream
        ds_path = write_ds_config(args.zero, args.dtype, folder)
        cfg, ds = T.prepare("finetune", args.config, experiment_sets(args, folder / "run"), str(ds_path))
        self.cfg, self.T = cfg, T
        self.run = T.start(cfg, ds, "finetune")
        ensure_data(cfg, progress=True)
        train_spec = split_path(cfg, "train")
        _, tokenizer = ensure_tokenizer(cfg, [train_spec])
        self.engine = T.create_engine(build_model(cfg, tokenizer.vocab_size), self.run)
        self.module = self.engine.module
        mbs = cfg.train.micro_batch_size
        self.stream = BatchStream(loader_config(cfg, train_spec, self.module, mbs,
                                                swap_captions=cfg.finetune.swap_negatives),
                                  tokenizer, self.run.rank, self.run.world_size)
        self.pool = CandidatePool.for_config(cfg, mbs)
        for _ in range(self.pool.capacity_batches - 1):   # a fresh run's fill before step 0
            self.pool.add(next(self.stream))
        self.step_fn = FinetuneStep(cfg, self.module, self.pool, self.run.device, cfg.train.steps,
                                    forward=self.engine)
        self.clock = PhaseClock(self.run.device)
        self.shape = ModelShape(self.module, self.image_tokens())
        self._instrument()

    def image_tokens(self) -> int:
        """Image tokens per image (patch grid, or the pool's padded region count)."""
        from pipeline.train.build import to_device
        sample = to_device(self.pool.images(torch.zeros(1, dtype=torch.long)), self.run.device)
        with torch.no_grad():
            return int(self.module.encode_image(sample).mask.shape[1])

    def _instrument(self) -> None:
        import pipeline.train.finetune_step as fs
        clock, step_fn = self.clock, self.step_fn
        self.mined: dict = {}
        mine = step_fn.mine

        def mine_and_note(batch, step, generator):
            with clock.phase("mining"):
                out = mine(batch, step, generator)
            self.mined = dict(step_fn.counts)
            return out

        step_fn.mine = mine_and_note
        step_fn.forward = clock.wrap("transformer_fwd", step_fn.forward)
        fs.iais_loss = clock.wrap("iais", fs.iais_loss)
        fs.itc_loss = clock.wrap("itc", fs.itc_loss)

    def widths(self, batch: dict, hard_txt: int) -> dict[str, int]:
        """Padded text widths of the batch, of the pool's texts and of the trained pairs."""
        text_len = int(batch["input_ids"].shape[1])
        pool_len = int(self.pool.texts(torch.zeros(1, dtype=torch.long))["input_ids"].shape[1])
        trained = max(text_len, pool_len) if hard_txt else text_len
        if self.cfg.finetune.swap_negatives and "has_swap" in batch and bool(batch["has_swap"].any()):
            trained = max(trained, int(batch["swap_input_ids"].shape[1]))
        return {"text_len": text_len, "pool_text_len": pool_len, "trained_text_len": trained}

    def step(self, step: int) -> dict:
        """One optimizer step as loop.optimizer_step runs it; returns its phase seconds and reports."""
        from pipeline.train.build import to_device
        clock, engine = self.clock, self.engine
        start = time.perf_counter()
        with clock.phase("loader_wait"):
            batch = next(self.stream)
        with clock.phase("data_prep"):
            self.pool.add(batch)
            batch = to_device(batch, self.run.device)
        with clock.phase("step_fn"):
            loss, scalars = self.step_fn(batch, step, self.T.step_generator(self.cfg, step, self.run.rank))
        with clock.phase("backward"):
            engine.backward(loss)
        with clock.phase("optimizer"):
            engine.step()
        clock.sync()
        total = time.perf_counter() - start
        seconds = clock.take()
        seconds["trained_fwd"] = seconds.pop("step_fn") - seconds["mining"]
        text_anchored, image_anchored = self.step_fn.directions(step)
        b = int(batch["input_ids"].shape[0])
        rec = {"b": b, "text_anchored": text_anchored, "image_anchored": image_anchored,
               "pairs_scored": scalars["pairs_scored"], "pairs_trained": scalars["pairs_trained"],
               "images_encoded": scalars["images_encoded"], "images_mined": self.mined["images_encoded"],
               **self.widths(batch, self.cfg.finetune.hard_size if image_anchored else 0)}
        return {"seconds": seconds, "total": total, "rec": rec}

    def close(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- report

def shares(steps: list[dict]) -> dict[str, float]:
    """Share of the summed step time per phase (nested ones too) and what no phase covers ("other")."""
    total = sum(s["total"] for s in steps)
    sums = defaultdict(float)
    for s in steps:
        for name, value in s["seconds"].items():
            sums[name] += value
    out = {name: sums[name] / total for name in sums}
    out["other"] = 1.0 - sum(out[name] for name in PHASES)
    return out


def share_text(share: dict[str, float]) -> str:
    nested = [k for k in NESTED if k in share]
    inside = f" (of which {', '.join(f'{k} {share[k]:.3f}' for k in nested)})" if nested else ""
    parts = [f"{k} {share[k]:.3f}" + (inside if k == "trained_fwd" else "") for k in PHASES + ("other",)]
    return ", ".join(parts)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def print_profile(real: "RealStep", step: int, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        real.step(step)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of step {step} (top ops by {key}; phase:* rows are the phases' totals):")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=50))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=15, max_name_column_width=30,
                                                             max_shapes_column_width=70))


class Measurement:
    """The real steps, with a bare-encoder step and a matmul-peak sample after each measured one, so that a
    machine shared with other jobs slows all three alike."""

    def __init__(self, args, real: "RealStep"):
        self.args, self.real, self.device = args, real, real.run.device
        self.steps: list[dict] = []
        self.bare: BareEncoder | None = None
        self.bare_s: list[float] = []
        self.peaks: list[float] = []

    def run(self) -> "Measurement":
        args, real = self.args, self.real
        observed = ObservedFlops(real.module, real.shape)
        self.peaks.append(matmul_peak(self.device, args.dtype)[0])
        for step in range(args.warmup + args.steps):
            result = real.step(step)
            result["observed"] = observed.take()
            self.print_step(step, result)
            if self.bare is None:   # the first step's trained batch shape; its first step is its warm-up
                rec = result["rec"]
                self.bare = BareEncoder(real.shape, int(rec["pairs_trained"]), rec["trained_text_len"] + real.shape.m,
                                        self.device, args.dtype)
                self.bare.step()
            if step >= args.warmup:
                self.steps.append(result)
                self.bare_s.append(self.bare.seconds())
                self.peaks.append(matmul_peak(self.device, args.dtype)[0])
        observed.close()
        return self

    def print_step(self, step: int, result: dict) -> None:
        shown = {k: v for k, v in result["rec"].items() if k != "b"}
        print(f"  step {step}{' (warm-up)' if step < self.args.warmup else ''}: {result['total']:.3f} s, "
              f"{json.dumps(shown)}", flush=True)


def run(args) -> dict[str, float]:
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads)
    print(f"load average before: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        t0 = time.perf_counter()
        real = RealStep(args, Path(tmp))
        shape = real.shape
        print(f"setup {time.perf_counter() - t0:.1f} s: preset {args.preset} (H={shape.h}, L={shape.layers}, "
              f"I={shape.inter}, image tokens {shape.m}, backbone {shape.img / 1e6:.1f} MFLOP/image), "
              f"{args.device} {args.dtype}, ZeRO {args.zero}, threads {torch.get_num_threads()}, "
              f"batch {real.cfg.train.micro_batch_size}, pool {len(real.pool)} rows", flush=True)
        measured = Measurement(args, real).run()
        if args.profile:
            print_profile(real, args.warmup + args.steps, real.run.device)
        summary = summarise(args, measured)
        real.close()
    print(f"load average after: {load_average()}", flush=True)
    return summary


def phase_efficiency(parts: dict[str, float], share: dict[str, float], step_s: float, peak: float) -> str:
    """FLOP/s of the mining and of the trained forward+backward, as shares of the peak."""
    mining = parts["mining"] / max(share["mining"] * step_s, 1e-12) / peak
    trained_s = (share["trained_fwd"] + share["backward"]) * step_s
    trained = (parts["trained"] + parts["itc"] + parts["iais"]) / max(trained_s, 1e-12) / peak
    return f"mining {mining:.3f}, trained fwd+bwd {trained:.3f} (the optimizer, data and other phases: 0 FLOPs)"


def summarise(args, measured: Measurement) -> dict[str, float]:
    real, steps = measured.real, measured.steps
    shape, cfg, device, bare = real.shape, real.cfg, real.run.device, measured.bare
    parts = [step_flops(shape, s["rec"], cfg) for s in steps]
    part_means = {k: mean(p[k] for p in parts) for k in parts[0]}
    flops = sum(part_means.values())
    step_s = mean(s["total"] for s in steps)
    peak, typical_peak = max(measured.peaks), statistics.median(measured.peaks)   # best of N; and the median
    mfu = flops / step_s / peak
    share = shares(steps)
    observed = mean(s["observed"] for s in steps)
    counted = flops - part_means["iais"]
    bare_s = mean(measured.bare_s)
    bare_mfu = bare.flops / bare_s / peak
    print(f"model FLOPs per step: {flops / 1e9:.2f} G ("
          + ", ".join(f"{k} {v / 1e9:.3g} G" for k, v in part_means.items())
          + f"); forward hooks saw {observed / 1e9:.2f} G of the {counted / 1e9:.2f} G counted without IAIS "
            f"(ratio {observed / counted:.3f})")
    print(f"steps/s {1 / step_s:.3f} (mean step {step_s:.3f} s over {len(steps)} steps); achieved "
          f"{flops / step_s / 1e9:.1f} GFLOP/s; matmul peak {peak / 1e9:.1f} GFLOP/s (best {peaks_text(measured)}); "
          f"MFU {mfu:.3f} (vs the median peak sample {typical_peak / 1e9:.1f}: {flops / step_s / typical_peak:.3f})")
    print("phase shares: " + share_text(share))
    print("share of the peak by phase: " + phase_efficiency(part_means, share, step_s, peak))
    print(f"bare nn.TransformerEncoder step [{bare.batch} x {bare.seq} x {shape.h}], {shape.layers} layers, after "
          f"each step: {bare_s:.3f} s, {bare.flops / 1e9:.2f} GFLOP, {bare.flops / bare_s / 1e9:.1f} GFLOP/s, "
          f"bare_mfu={bare_mfu:.3f} (vs the median peak: {bare.flops / bare_s / typical_peak:.3f})")
    targets = "MFU >= 0.50, loader_wait_share <= 0.02" if device.type == "cpu" else "MFU >= 0.45 (ZeRO-2, bf16)"
    print(f"targets ({device.type}): {targets}")
    return {"mfu": mfu, "mining_share": share["mining"], "loader_wait_share": share["loader_wait"],
            "step_s": step_s, "bare_mfu": bare_mfu}


def peaks_text(measured: Measurement) -> str:
    args = measured.args
    n = 8192 if measured.device.type == "cuda" else 2048
    samples = ", ".join(f"{p / 1e9:.0f}" for p in measured.peaks)
    threads = torch.get_num_threads()
    return f"of {len(measured.peaks)} samples of {n}^3 {args.dtype} matmuls, {threads} threads: {samples}"


def result_line(args, values: dict[str, float]) -> str:
    head = f"RESULT preset={args.preset} device={args.device} dtype={args.dtype}"
    return head + "".join(f" {k}={values.get(k, float('nan')):.4g}" for k in RESULT_KEYS)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        values = run(args)
    except Exception:  # a benchmark reports and exits 0; the traceback says what broke
        traceback.print_exc()
        values = {}
    sys.stdout.flush()
    print(result_line(args, values), flush=True)


if __name__ == "__main__":
    main()
