"""Pieces both training stages share: start-up, DeepSpeed engine, checkpoints with exact resume, export,
and the per-step metric window (averaged over ranks, logged by rank 0)."""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipeline import distributed as dist_utils
from pipeline.config import (ExperimentConfig, fingerprint_changes, read_ds_config, resolve_ds_config, resolve_path,
                             to_dict, training_fingerprint, validate_paths, load_config)
from pipeline.errors import UserError

CLIENT_FILE = "relalign_rank{rank}.pt"


@dataclass
class Run:
    """Everything a stage needs after start-up."""
    cfg: ExperimentConfig
    ds_config: dict
    stage: str
    run_dir: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def prepare(stage: str, config_path: Optional[str], overrides: list[str], ds_path: str) -> tuple[ExperimentConfig, dict]:
    """Everything that can fail on user input, before any process-group work."""
    cfg = load_config(config_path, overrides)
    validate_model_config(cfg)
    validate_paths(cfg, stage)
    ds = resolve_ds_config(read_ds_config(ds_path), cfg, dist_utils.world_size(), accelerator_name(),
                           src=f"ds_config {ds_path}")
    check_resume_config(cfg, resume_point(cfg))
    return cfg, ds


def model_overrides(cfg: ExperimentConfig) -> dict:
    """ModelConfig overrides implied by the data section (text length, image size/mode) + model.overrides."""
    from models.registry import merge
    implied = {"max_text_len": cfg.data.max_text_len, "image": {"image_size": cfg.data.image_size}}
    if cfg.data.image_mode != "patch":
        implied["image"]["mode"] = cfg.data.image_mode
    return merge(implied, cfg.model.overrides)


def validate_model_config(cfg: ExperimentConfig) -> None:
    from models import ConfigError, ModelConfig
    from models.registry import merge, preset_config
    try:
        base = _base_model_config(cfg.model.preset, preset_config)
        ModelConfig.from_dict(merge(base, model_overrides(cfg)))
    except ConfigError as exc:
        raise UserError(f"model config (preset {cfg.model.preset!r} + model.overrides): {exc}") from None
    except TypeError as exc:
        raise UserError(f"model.overrides: {exc}") from None


def _base_model_config(preset: str, preset_config) -> dict:
    path = Path(preset)
    if path.suffix == ".json" or path.is_dir():
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"config 'model.preset' = {preset}: no such model config file")
        return json.loads(file.read_text())
    return preset_config(preset)


def start(cfg: ExperimentConfig, ds: dict, stage: str) -> Run:
    """Threads, process group, device, seeds. Call after :func:`prepare` succeeded."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")) or 1)
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, local_size))
    torch.set_num_threads(threads)
    acc = get_accelerator()
    _skip_shm_comm_op(acc)
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), verbose=False)
    local = dist_utils.local_rank()
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local)
        device = torch.device(acc.device_name(local))
    run = Run(cfg=cfg, ds_config=ds, stage=stage, run_dir=resolve_path(cfg.run_dir), device=device,
              rank=dist_utils.rank(), world_size=dist_utils.world_size())
    if run.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "experiment.yaml").write_text(_yaml(to_dict(cfg)))
        (run.run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
    seed_everything(cfg.seed + run.rank)
    return run


_T0 = time.perf_counter()


def note(run: Run, message: str) -> None:
    """One progress line on rank 0, with the seconds since the process started."""
    if run.is_main:
        print(f"[{run.stage} {time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


def _skip_shm_comm_op(acc) -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op in init_distributed (40-130 s, and
    recompiled whenever the build environment differs, e.g. with/without CUDA_VISIBLE_DEVICES). gloo does
    every collective without it, fast enough for CPU runs; RELALIGN_SHM_COMM=1 keeps DeepSpeed's default."""
    if acc.device_name() != "cpu" or os.environ.get("RELALIGN_SHM_COMM") == "1":
        return
    import deepspeed.ops
    builder = acc.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def step_generator(cfg: ExperimentConfig, step: int, rank: int, salt: int = 0) -> torch.Generator:
    """RNG for a step's random choices: a pure function of (seed, step, rank), so resume needs no state."""
    g = torch.Generator()
    g.manual_seed(((cfg.seed * 1_000_003 + step) * 65_537 + rank) * 31 + salt)
    return g


# ----------------------------------------------------------------------------- engine

_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm, torch.nn.RMSNorm)


def parameter_groups(model: torch.nn.Module, decay_bias_and_norm: bool) -> list[dict]:
    """Optimizer groups: biases and normalisation weights without weight decay (as UNITER/IAIS and BERT:
    decaying a LayerNorm gain pulls it to 0), unless ``decay_bias_and_norm``. Other groups take the
    DeepSpeed JSON's weight_decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if decay_bias_and_norm:
        return [{"params": trainable}]
    exempt = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    exempt |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    groups = [{"params": [p for p in trainable if id(p) not in exempt]},
              {"params": [p for p in trainable if id(p) in exempt], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_engine(model: torch.nn.Module, run: Run):
    import deepspeed
    groups = parameter_groups(model, run.cfg.train.decay_bias_and_norm)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=run.ds_config)
    return engine


def zero_stage(run: Run) -> int:
    return int(run.ds_config.get("zero_optimization", {}).get("stage", 0))


def init_rank_head(engine, run: Run) -> None:
    """rank head <- ITM "match" row, ZeRO-3 safe (parameters gathered, modified on rank 0, re-partitioned)."""
    module = engine.module
    if zero_stage(run) == 3:
        import deepspeed
        params = list(module.itm_head.parameters()) + list(module.rank_head.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if run.is_main:
                module.init_rank_from_itm()
    else:
        module.init_rank_from_itm()


def current_lr(engine) -> float:
    return float(engine.get_lr()[0]) if engine.get_lr() else 0.0


def grad_norm(engine) -> float:
    value = engine.get_global_grad_norm()
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


COMPLETE_FILE = "relalign_complete.json"


def save_checkpoint(engine, run: Run, step: int, loader_state: dict, run_id: Optional[str],
                    extra: Optional[dict] = None, tag: Optional[str] = None) -> str:
    """DeepSpeed checkpoint ``step<N>`` (or ``tag``) + this rank's client file (loader position, RNG states).

    Collective. Complete only once every rank has written its part: DeepSpeed saves without touching
    ``latest``, a barrier, then rank 0 writes the tag's completion marker (step, world size, training config)
    and, for step tags, ``latest``, each atomically (temporary file + rename). A job killed before that
    leaves the previous checkpoint as the one resume picks.
    """
    step_tag = tag is None
    tag = tag or f"step{step:07d}"
    tag_dir = run.ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    client = {"step": step, "loader": loader_state, "rng": rng_state(), "mlflow_run_id": run_id,
              "extra": extra or {}}
    torch.save(client, tag_dir / CLIENT_FILE.format(rank=run.rank))
    engine.save_checkpoint(str(run.ckpt_dir), tag=tag, client_state={"step": step, "mlflow_run_id": run_id},
                           save_latest=False)
    dist_utils.barrier()
    if run.is_main:
        marker = {"step": step, "world_size": run.world_size, "config": training_fingerprint(run.cfg)}
        _write_atomic(tag_dir / COMPLETE_FILE, json.dumps(marker, indent=1) + "\n")
        if step_tag:
            _write_atomic(run.ckpt_dir / "latest", tag)
    dist_utils.barrier()
    return tag


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete step checkpoint under ``ckpt_dir``, oldest first."""
    found = []
    for marker in ckpt_dir.glob(f"step*/{COMPLETE_FILE}"):
        try:
            found.append((int(json.loads(marker.read_text())["step"]), marker.parent.name))
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(found)


def resume_point(cfg: ExperimentConfig) -> Optional[tuple[Path, str]]:
    """(checkpoint directory, tag) to resume from, or None (config checkpoint.resume / --resume): the newest
    complete step checkpoint; a partial one (a job killed while saving) is never resumed."""
    resume = cfg.checkpoint.resume
    if resume is False:
        return None
    path = resolve_path(cfg.run_dir) / "checkpoints" if resume in (True, "auto") else resolve_path(str(resume))
    tags = complete_tags(path)
    if not tags:
        if resume == "auto":
            return None
        raise UserError(f"checkpoint.resume: {path} holds no complete checkpoint to resume from")
    return path, tags[-1][1]


def check_resume_config(cfg: ExperimentConfig, point: Optional[tuple[Path, str]]) -> None:
    """UserError when the checkpoint to resume was trained with another training-relevant config."""
    if point is None or cfg.checkpoint.ignore_config_change:
        return
    path, tag = point
    saved = json.loads((path / tag / COMPLETE_FILE).read_text()).get("config", {})
    changes = fingerprint_changes(saved, training_fingerprint(cfg))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise UserError(f"checkpoint {path / tag} was trained with another config ({shown}): use a new run_dir, "
                        f"set checkpoint.resume=false, or --set checkpoint.ignore_config_change=true to continue")


def load_checkpoint(engine, run: Run, point: tuple[Path, str]) -> dict:
    """Restore engine (model, optimizer, scheduler) and this rank's client state; returns the latter."""
    path, tag = point
    load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"checkpoint.resume: could not load the DeepSpeed checkpoint {path / tag}")
    file = path / tag / CLIENT_FILE.format(rank=run.rank)
    if not file.is_file():
        raise UserError(f"checkpoint {path / tag} has no {file.name}: it was written by another world size; "
                        f"resume with the same number of ranks")
    client = torch.load(file, weights_only=False)
    set_rng_state(client["rng"])
    note(run, f"resumed from checkpoint {path / tag} (step {client['step']})")
    return client


# ----------------------------------------------------------------------------- export

def checkpoint_state_dict(ckpt_dir: Path, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """fp32 model weights of the DeepSpeed checkpoint ``ckpt_dir/tag`` (default: the one ``latest`` names).

    ZeRO 1-3 (partitioned optimizer files): DeepSpeed's zero_to_fp32 reads the fp32 master partitions,
    exact in fp32 and bf16 runs alike (the live ZeRO-3 "16bit" gather would return bf16 weights under bf16).
    Stage 0: the module weights of its model-states file (our own file).
    """
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        if not (ckpt_dir / "latest").is_file():
            raise UserError(f"{ckpt_dir}: not a DeepSpeed checkpoint directory (no 'latest' file)")
        tag = (ckpt_dir / "latest").read_text().strip()
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    stage0 = tag_dir / "mp_rank_00_model_states.pt"
    if not stage0.is_file():
        raise UserError(f"DeepSpeed checkpoint {tag_dir} has no model states")
    saved = torch.load(stage0, map_location="cpu", weights_only=False)
    return {k: v.detach().float() for k, v in saved["module"].items()}


def consolidated_state_dict(engine, run: Run, tag: str) -> Optional[dict]:
    """fp32 full state dict on rank 0 (None elsewhere), from the DeepSpeed checkpoint ``tag``."""
    dist_utils.barrier()
    return checkpoint_state_dict(run.ckpt_dir, tag) if run.is_main else None


def export_pretrained(engine, run: Run, tag: str, out_dir: Path, tokenizer_path: Optional[Path]) -> Optional[Path]:
    """Consolidated fp32 ``save_pretrained`` directory (+ tokenizer model) loadable without DeepSpeed."""
    from models import RetrievalModel
    state = consolidated_state_dict(engine, run, tag)
    if run.is_main:
        model = RetrievalModel(engine.module.config, load_backbone_weights=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"mlm_head.decoder.weight"}
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"export: state dict mismatch missing={missing} unexpected={unexpected}")
        model.save_pretrained(out_dir)
        if tokenizer_path is not None:
            (out_dir / f"tokenizer{tokenizer_path.suffix}").write_bytes(tokenizer_path.read_bytes())
    dist_utils.barrier()
    return out_dir if run.is_main else None


# ----------------------------------------------------------------------------- metrics

class MetricWindow:
    """Sums scalars over a logging window; ``flush`` averages them over steps and ranks (counts summed)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, values: dict[str, float], samples: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.samples += samples

    def flush(self, skipped: dict[str, int]) -> dict[str, float]:
        """Collective: every rank calls it at the same steps with the same keys."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        means = {k: v / self.counts[k] for k, v in self.sums.items()}   # keys logged at some steps only
        means = dist_utils.reduce_scalars(means, "mean")
        # skip reasons differ between ranks (a rank may have skipped nothing): union of keys, 0 if absent
        counts = dist_utils.reduce_scalars({"samples_per_s": self.samples / elapsed,
                                            **{f"skipped_{k}": float(v) for k, v in skipped.items()}}, "sum",
                                           union_keys=True)
        self.__init__()
        return {**means, **counts}


def append_jsonl(run: Run, row: dict) -> None:
    """<run_dir>/metrics.jsonl on rank 0: the logged scalars, readable without MLflow."""
    if run.is_main:
        with open(run.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def finite_or_raise(values: dict[str, float], step: int) -> None:
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"step {step}: non-finite {bad}; lower the learning rate or check the data")


def tracker_params(run: Run) -> dict[str, Any]:
    from pipeline.config import flatten
    from pipeline.tracking import package_versions
    params = {f"config.{k}": v for k, v in flatten(to_dict(run.cfg)).items()}
    params.update({f"ds.{k}": v for k, v in flatten(run.ds_config).items()})
    params.update({f"version.{k}": v for k, v in package_versions().items()})
    return params


def open_tracker(run: Run, client: Optional[dict]):
    """The run's MLflow tracker; a resumed run (``client`` state) continues its MLflow run, a new one
    logs params and configs first."""
    from pipeline.tracking import Tracker
    tracker = Tracker.create(run.cfg.tracking, run.is_main, run.run_dir,
                             resume_run_id=client.get("mlflow_run_id") if client else None)
    if client is None:
        tracker.log_params({**tracker_params(run), **run_info(run)})
        tracker.log_artifact(run.run_dir / "experiment.yaml", "configs")
        tracker.log_artifact(run.run_dir / "ds_config.json", "configs")
    return tracker


def run_info(run: Run) -> dict[str, Any]:
    """Collective: world size, node count, host names."""
    hosts = dist_utils.hostnames()
    return {"world_size": run.world_size, "node_count": dist_utils.node_count(),
            "hostnames": ",".join(sorted(set(hosts)))}


def progress(run: Run, total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not run.is_main, dynamic_ncols=True, desc=run.stage,
                unit="step", mininterval=2.0)
