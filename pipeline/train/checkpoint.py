"""DeepSpeed checkpoints with exact resume: atomic completion, the resume point and its config check,
the fp32 weights of a checkpoint and the consolidated export."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import distributed as dist_utils
from pipeline.config import (ExperimentConfig, fingerprint_changes, resolve_path, training_fingerprint)
from pipeline.errors import UserError
from pipeline.train import safe_load
from pipeline.train.runtime import Run


CLIENT_FILE = "relalign_rank{rank}.pt"


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    """The RNG states as tensors and plain values, so the weights-only loader reads them back."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(value):
    """``value`` with numpy scalars/arrays as Python numbers/lists (the weights-only loader refuses numpy)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


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
    client = {"step": step, "loader": plain(loader_state), "rng": rng_state(), "mlflow_run_id": run_id,
              "extra": plain(extra or {})}
    problem = _written(lambda: torch.save(client, tag_dir / CLIENT_FILE.format(rank=run.rank)),
                       tag_dir / CLIENT_FILE.format(rank=run.rank))
    engine.save_checkpoint(str(run.ckpt_dir), tag=tag, client_state={"step": step, "mlflow_run_id": run_id},
                           save_latest=False)
    _agree_written(run, tag_dir, problem or _engine_write_error(engine))
    if run.is_main:
        marker = {"step": step, "world_size": run.world_size, "config": training_fingerprint(run.cfg)}
        problem = _written(lambda: _write_atomic(tag_dir / COMPLETE_FILE, json.dumps(marker, indent=1) + "\n"),
                           tag_dir / COMPLETE_FILE)
        if step_tag and problem is None:
            problem = _written(lambda: _write_atomic(run.ckpt_dir / "latest", tag), run.ckpt_dir / "latest")
    _agree_written(run, tag_dir, problem if run.is_main else None)
    return tag


def _written(write, path: Path) -> Optional[str]:
    """None when ``write()`` succeeded, else what went wrong (a full disk, a read-only directory)."""
    try:
        write()
    except (OSError, RuntimeError) as exc:
        return f"{path}: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}"
    return None


def _engine_write_error(engine) -> Optional[str]:
    take = getattr(engine.checkpoint_engine, "take_write_error", None)
    return take() if take is not None else None


def _agree_written(run: Run, tag_dir: Path, problem: Optional[str]) -> None:
    """Collective (a barrier with a verdict): when any rank failed to write its part, the partial tag is removed
    (freeing the space it took; the previous complete checkpoint is untouched) and every rank raises."""
    problems = [(r, p) for r, p in enumerate(dist_utils.all_gather_object(problem)) if p]
    if not problems:
        return
    if run.is_main:
        shutil.rmtree(tag_dir, ignore_errors=True)
    dist_utils.barrier()
    rank, what = problems[0]
    previous = complete_tags(run.ckpt_dir)
    kept = f"the last complete checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
    free = shutil.disk_usage(run.ckpt_dir).free // 2 ** 20
    raise UserError(f"checkpoint {tag_dir.name} could not be written (rank {rank}: {what}; {free} MiB free in "
                    f"{run.ckpt_dir}); {kept}. Free space and resume with --resume")


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
    partial = incomplete_tags(path, {tag for _, tag in tags})
    if partial and dist_utils.is_main():
        print(f"[resume] ignoring incomplete checkpoint(s) {', '.join(partial)} in {path} (no completion marker: "
              f"the job stopped while saving)", flush=True)
    if not tags:
        if resume == "auto":
            return None
        raise UserError(f"checkpoint.resume: {path} holds no complete checkpoint to resume from")
    return path, tags[-1][1]


def incomplete_tags(ckpt_dir: Path, complete: set[str]) -> list[str]:
    """Step tag directories under ``ckpt_dir`` without a completion marker, by name."""
    return sorted(d.name for d in ckpt_dir.glob("step*") if d.is_dir() and d.name not in complete)


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


def check_resume_world_size(point: tuple[Path, str], world_size: int) -> None:
    """UserError, before DeepSpeed reads anything, when the checkpoint was written by another number of ranks:
    ZeRO partitions and each rank's loader position (its share of the stream) belong to that world size."""
    path, tag = point
    marker = path / tag / COMPLETE_FILE
    saved = json.loads(marker.read_text()).get("world_size") if marker.is_file() else None
    if saved is not None and saved != world_size:
        raise UserError(f"checkpoint {path / tag} was written by {saved} ranks but this job has {world_size}: resume "
                        f"with {saved} ranks (relalign cannot re-split a checkpoint's data-loader positions, so "
                        f"DeepSpeed's universal checkpoints do not apply), or start afresh with a new run_dir or "
                        f"model.init={path}")


def load_checkpoint(engine, run: Run, point: tuple[Path, str]) -> dict:
    """Restore engine (model, optimizer, scheduler) and this rank's client state; returns the latter."""
    path, tag = point
    check_resume_world_size(point, run.world_size)
    # the engine's reads go through SafeCheckpointEngine; forced for any DeepSpeed read that bypasses it
    with safe_load.forced_weights_only(sorted((path / tag).glob("*.pt"))):
        load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"checkpoint.resume: could not load the DeepSpeed checkpoint {path / tag}")
    file = path / tag / CLIENT_FILE.format(rank=run.rank)
    if not file.is_file():
        raise UserError(f"checkpoint {path / tag} has no {file.name}: it was written by another world size; "
                        f"resume with the same number of ranks")
    client = safe_load.load(file)
    set_rng_state(client["rng"])
    if run.is_main:
        print(f"[{run.stage}] resumed from checkpoint {path / tag} (step {client['step']})", flush=True)
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
    if not tag_dir.is_dir():
        raise UserError(f"{ckpt_dir}: 'latest' names tag {tag!r} but {tag_dir} does not exist")
    if any(tag_dir.glob("*optim_states.pt")):
        return _zero_fp32_state_dict(ckpt_dir, tag)
    stage0 = tag_dir / "mp_rank_00_model_states.pt"
    if not stage0.is_file():
        raise UserError(f"DeepSpeed checkpoint {tag_dir} has no model states")
    saved = safe_load.load(stage0)
    module = saved.get("module") if isinstance(saved, dict) else None
    if not isinstance(module, dict) or not all(torch.is_tensor(v) for v in module.values()):
        raise UserError(f"{stage0}: not a DeepSpeed model-states file (no 'module' state dict of tensors)")
    return {k: v.detach().float() for k, v in module.items()}


def _zero_fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 calls torch.load(weights_only=False) itself: run it weights-only."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag_dir = ckpt_dir / tag
    try:
        with safe_load.forced_weights_only(sorted(tag_dir.glob("*.pt"))):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except (EOFError, RuntimeError, ValueError, KeyError) as exc:
        detail = safe_load.first_line(exc) if not isinstance(exc, KeyError) else f"no {exc}"
        raise UserError(f"DeepSpeed checkpoint {tag_dir} is unreadable or incomplete ({detail})") from None


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
