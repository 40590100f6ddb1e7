"""One stage as its own process under the ``deepspeed`` launcher, its output in a log file."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.ablation.plan import Plan, RunSpec, finished_metrics, read_record, write_record
from pipeline.config import REPO_ROOT
from pipeline.errors import UserError

TAIL_LINES = 15


def launcher() -> list[str]:
    """The ``deepspeed`` console script of this interpreter's environment, else its module."""
    script = Path(sys.executable).parent / "deepspeed"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PRETRAIN_STAGE_MODULE = "pipeline.ablation.pretrain_stage"


def stage_command(target: Sequence[str], config: Path, ds: Path, sets: Sequence[str]) -> list[str]:
    """The launcher command for ``target`` (a script path, or ``--module`` and a module name)."""
    cmd = [*launcher(), "--master_port", str(free_port()), *target, "--deepspeed_config", str(ds),
           "--config", str(config)]
    for assignment in sets:
        cmd += ["--set", assignment]
    return cmd


def child_env() -> dict[str, str]:
    """This environment, with this interpreter's bin/ first on PATH (the launcher starts ``python``) and the
    repository on PYTHONPATH (for ``--module``, from any working directory)."""
    bin_dir = str(Path(sys.executable).parent)
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=python_path)


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def run_logged(cmd: Sequence[str], log: Path) -> int:
    """Run ``cmd`` with stdout and stderr appended to ``log`` (one header line per attempt); its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n===== [ablation] {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=child_env(),
                              stdin=subprocess.DEVNULL, check=False)
    return proc.returncode


@dataclass
class RunOutcome:
    """status: "reused" (had results), "finished" (ran now, has results) or "crashed"."""

    spec: RunSpec
    status: str
    exit_code: Optional[int] = None
    seconds: float = 0.0
    metrics: Optional[dict[str, Any]] = None
    tail: list[str] = field(default_factory=list)

    @property
    def has_results(self) -> bool:
        return self.metrics is not None


def run_finetune(plan: Plan, spec: RunSpec, tracking_sets: Sequence[str]) -> RunOutcome:
    """Reuse ``spec``'s results if it has them, else fine-tune it now (a crash is an outcome, not an error)."""
    metrics = finished_metrics(spec)
    if metrics is not None:
        print(f"[ablation] {spec.label}: finished, reusing {spec.test_metrics}", flush=True)
        seconds = read_record(spec).get("seconds")
        return RunOutcome(spec, "reused", seconds=float(seconds) if isinstance(seconds, (int, float)) else 0.0,
                          metrics=metrics)
    write_record(plan, spec)
    print(f"[ablation] {spec.label}: running (log {spec.log})", flush=True)
    start = time.perf_counter()
    code = run_logged(stage_command([str(REPO_ROOT / "launch" / "finetune.py")], plan.config,
                                    plan.deepspeed_config, [*spec.sets, *tracking_sets]), spec.log)
    seconds = time.perf_counter() - start
    metrics = finished_metrics(spec) if code == 0 else None
    if metrics is not None:
        write_record(plan, spec, seconds=round(seconds, 1))
        print(f"[ablation] {spec.label}: done in {seconds:.0f} s", flush=True)
        return RunOutcome(spec, "finished", code, seconds, metrics)
    outcome = RunOutcome(spec, "crashed", code, seconds, tail=tail(spec.log))
    report_crash(outcome)
    return outcome


def report_crash(outcome: RunOutcome) -> None:
    spec = outcome.spec
    why = f"exit code {outcome.exit_code}" if outcome.exit_code else "no test_metrics.json written"
    lines = [f"[ablation] {spec.label} CRASHED ({why}) after {outcome.seconds:.0f} s; log {spec.log}; last lines:"]
    lines += [f"    {line}" for line in outcome.tail]
    print("\n".join(lines), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared pretraining

def run_pretraining(plan: Plan, pretrain_config: str) -> None:
    """The fine-tunes' pretraining stage once, as its own process (pipeline.ablation.pretrain_stage: it pretrains
    unless the stage's export is cached for that config), so that no variant pays for it or fails on it. A
    failure stops the ablation: UserError (exit 2) when the pretraining rejected its input."""
    log = plan.out / "pretrain.log"
    print(f"[ablation] pretraining stage {pretrain_config}, once for every variant (log {log})", flush=True)
    start = time.perf_counter()
    code = run_logged(stage_command(["--module", PRETRAIN_STAGE_MODULE], plan.config, plan.deepspeed_config,
                                    plan.base_sets), log)
    if code == 0:
        print(f"[ablation] pretraining stage ready after {time.perf_counter() - start:.0f} s", flush=True)
        return
    lines = tail(log, 40)
    errors = [line.strip() for line in lines if line.startswith("error: ")]
    why = errors[-1][len("error: "):] if errors else (lines[-1].strip() if lines else "no output")
    message = f"pretraining {pretrain_config} failed with exit code {code}: {why} (log {log})"
    if code == 2:
        raise UserError(message)
    raise PretrainingFailed(message)


class PretrainingFailed(RuntimeError):
    """The shared pretraining crashed: nothing to fine-tune from (exit 1)."""
