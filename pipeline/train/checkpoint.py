"""DeepSpeed checkpoints with exact resume: atomic completion, the resume point and its config check,
the fp32 weights of a checkpoint and the consolidated export."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import distributed as dist_utils
from pipeline.config import (ExperimentConfig, fingerprint_changes, resolve_path, training_fingerprint)
from pipeline.errors import UserError
from pipeline.train.runtime import Run


CLIENT_FILE = "relalign_rank{rank}.pt"


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
