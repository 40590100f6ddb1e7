"""Start-up of a training stage: config checks before any process-group work, threads, process group,
device, seeds, the DeepSpeed engine with its parameter groups, and the MLflow tracker."""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import distributed as dist_utils
from pipeline.config import (ExperimentConfig, check_layer_indices, read_ds_config, resolve_ds_config, resolve_path,
                             to_dict, load_config, write_probe_error)
from pipeline.data.paths import validate_paths
from pipeline.errors import UserError


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


def prepare(stage: str, config_path: Optional[str], overrides: list[str],
            ds_path: str) -> tuple[ExperimentConfig, dict]:
    """Everything that can fail on user input, before any process-group work."""
    cfg = load_config(config_path, overrides)
    if stage == "finetune" and cfg.model.pretrain_config:
        from pipeline.train.stages import with_stage_init
        cfg = with_stage_init(cfg)
    if cfg.tracking.enabled and cfg.tracking.tracking_uri:
        from pipeline.tracking.common import check_tracking_uri
        check_tracking_uri(cfg.tracking.tracking_uri, "tracking.tracking_uri")
    feat_dim = validate_model_config(cfg)
    validate_paths(cfg, stage, feat_dim)
    check_run_dir_writable(cfg.run_dir)
    accelerator = accelerator_name()
    bf16 = accelerator != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ds = resolve_ds_config(read_ds_config(ds_path), cfg, dist_utils.world_size(), accelerator,
                           src=f"ds_config {ds_path}", bf16_supported=bf16)
    from pipeline.train.checkpoint import check_resume_config, resume_point
    check_resume_config(cfg, resume_point(cfg))
    return cfg, ds


def check_run_dir_writable(run_dir: str) -> None:
    """UserError unless ``run_dir`` is (or can be created as) a directory we can write: the nearest existing
    folder on its path gets a probe file, created and removed (file modes say nothing for root, a read-only
    mount does)."""
    path = resolve_path(run_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise UserError(f"config 'run_dir' = {run_dir} {what}: give a directory path")
    problem = write_probe_error(existing)
    if problem:
        raise UserError(f"config 'run_dir' = {run_dir}: cannot write in {existing} ({problem}): give a "
                        f"writable run_dir")


def validate_model_config(cfg: ExperimentConfig) -> Optional[int]:
    """The model config resolves exactly as build_model will resolve it, and the layers that finetune.iais.layers
    and eval.isd_layer name exist in it. Returns its region-feature width (None outside features mode)."""
    from pipeline.train.build import model_config
    model = model_config(cfg)
    iais_layers = cfg.finetune.iais.layers
    check_layer_indices(iais_layers, model.num_layers, f"config 'finetune.iais.layers' = {iais_layers}")
    check_layer_indices([cfg.eval.isd_layer], model.num_layers, f"config 'eval.isd_layer' = {cfg.eval.isd_layer}")
    return model.image.feat_dim


def start(cfg: ExperimentConfig, ds: dict, stage: str, timeout_s: Optional[float] = None) -> Run:
    """Threads, process group, device, seeds. Call after :func:`prepare` succeeded. ``timeout_s``: the
    collective timeout (default: ``train.collective_timeout_s``, else DeepSpeed's)."""
    from deepspeed.accelerator import get_accelerator

    info = dist_utils.discover(os.environ)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
    acc = get_accelerator()
    info = init_distributed(info, acc.communication_backend_name(), timeout_s or _collective_timeout_s(cfg))
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(info.local_rank)
        device = torch.device(acc.device_name(info.local_rank))
    run = Run(cfg=cfg, ds_config=ds, stage=stage, run_dir=resolve_path(cfg.run_dir), device=device,
              rank=dist_utils.rank(), world_size=dist_utils.world_size())
    if run.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "experiment.yaml").write_text(_yaml(to_dict(cfg)))
        (run.run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
    seed_everything(cfg.seed + run.rank)
    return run


def init_distributed(info: dist_utils.ProcessInfo, backend: str, timeout_s: float) -> dist_utils.ProcessInfo:
    """The process group of ``info`` through DeepSpeed, from the environment we export (never mpi4py), without
    DeepSpeed's JIT-built CPU shared-memory op (:func:`_skip_shm_comm_op`)."""
    from datetime import timedelta
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    _skip_shm_comm_op(get_accelerator())
    info = dist_utils.export_env(info)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s), rank=info.rank,
                               world_size=info.world_size)
    _later_groups_time_out_after(timedelta(seconds=timeout_s))
    return info


def _later_groups_time_out_after(timeout) -> None:
    """DeepSpeed builds its own process groups with ``new_group(ranks)`` and no timeout (ZeRO reduces over its
    clone of the world group), and torch gives those its 30-minute default: a hung rank stalled them that long,
    whatever ``train.collective_timeout_s`` said. torch reads that default when a group is made, so setting it
    here gives every later group the collective timeout."""
    from torch.distributed import distributed_c10d
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def _collective_timeout_s(cfg: ExperimentConfig) -> float:
    return cfg.train.collective_timeout_s or dist_utils.default_timeout_s()


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
    g.manual_seed((((cfg.seed * 1_000_003 + step) * 65_537 + rank) * 31 + salt) % 2 ** 64)   # torch's seed range
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
    from pipeline.train.safe_load import use_safe_loading
    use_safe_loading(engine)   # DeepSpeed's checkpoint reads never unpickle code
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
