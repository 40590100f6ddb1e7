"""One short fine-tune under the deepspeed launcher, measured from outside: every rank's peak resident set
(VmHWM, read from /proc while it runs) and the step time it logged (micro_batch / samples_per_s in
<run_dir>/metrics.jsonl, mean over the logged windows after the first). Shared by bench/memory.py and
bench/growth.py."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.ablation.runner import child_env, free_port, launcher  # noqa: E402

DEMO_CONFIG = REPO / "launch" / "configs" / "demo_tiny.yaml"
# the benchmarks' runs (here and bench/train_step.py): the preset's overrides (base at its native 224 px: 196
# patch tokens), then random init (no pretraining stage), no tracking, nothing resumed, validated, tested or
# exported; a launched run still saves its final checkpoint
PRESET_SETS = {"tiny": ["model.preset=tiny"], "small": ["model.preset=small"],
               "base": ["model.preset=base", "data.image_size=224"]}
RUN_SETS = ["model.pretrain_config=null", "model.init=null", "tracking.enabled=false", "checkpoint.resume=false",
            "checkpoint.export=false", "checkpoint.every=0", "train.val_every=0", "train.grad_accum=1",
            "eval.test=false"]
POLL_S = 0.2


@dataclass(frozen=True)
class Measured:
    ok: bool
    peak_mib: float        # the largest rank's peak RSS
    step_s: float
    seconds: float         # wall time of the whole launch


def ds_config(stage: str, folder: Path) -> Path:
    """ds_configs/zero<stage>.json (stage "3o": zero3_offload.json) with torch AdamW (no op to compile)."""
    name = "zero3_offload" if stage == "3o" else f"zero{stage}"
    ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    ds.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = True
    path = folder / f"{name}.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


def rank_pids(marker: str) -> list[int]:
    """Processes running launch/finetune.py as a rank (``--local_rank``) with ``marker`` in their arguments."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parts = [p.decode(errors="replace") for p in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if any(p.startswith("--local_rank") for p in parts) and any(marker in p for p in parts):
            pids.append(int(entry.name))
    return pids


def peak_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def logged_step_seconds(metrics_jsonl: Path, batch: int) -> float:
    rates = []
    if metrics_jsonl.is_file():
        rates = [row["samples_per_s"] for row in map(json.loads, metrics_jsonl.read_text().splitlines())
                 if "samples_per_s" in row]
    rates = rates[1:] or rates
    return sum(batch / r for r in rates) / len(rates) if rates else math.nan


def run_finetune(label: str, folder: Path, sets: Sequence[str], batch: int, ranks: int = 1, stage: str = "0",
                 config: Path = DEMO_CONFIG) -> Measured:
    """``sets`` must include train.micro_batch_size=<batch>; the run lives in <folder>/<label>/."""
    run_dir = folder / label
    cmd = [*launcher(), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(REPO / "launch" / "finetune.py"), "--deepspeed_config", str(ds_config(stage, folder)),
           "--config", str(config)]
    for s in (*sets, f"run_dir={run_dir}"):
        cmd += ["--set", s]
    peaks: dict[int, int] = {}
    log = folder / f"{label}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), stdin=subprocess.DEVNULL)
        while proc.poll() is None:
            for pid in rank_pids(str(run_dir)):
                peaks[pid] = max(peaks.get(pid, 0), peak_kib(pid))
            time.sleep(POLL_S)
    seconds = time.perf_counter() - start
    ok = proc.returncode == 0 and len(peaks) >= ranks
    if not ok:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        print(f"[bench] {label}: exit {proc.returncode}, {len(peaks)} ranks seen; log {log}: {' | '.join(tail)}",
              flush=True)
    return Measured(ok, max(peaks.values()) / 1024 if ok else math.nan,
                    logged_step_seconds(run_dir / "metrics.jsonl", batch) if ok else math.nan, seconds)
