"""Faults injected into real runs: a rank killed with SIGKILL mid-run (the job ends in bounded time; the
relaunch resumes from the last complete checkpoint, skipping one left half-written, and ends with the weights
of an uninterrupted run), and a checkpoint disk that fills up (one line, exit 2, the previous checkpoint
intact)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.train.checkpoint import complete_tags
from test_training import DEEPSPEED, REPO, _free_port, common_sets

STEPS = 8
KILL_BOUND_S = 120


def torch_adam_ds(tmp_path: Path, zero: str = "zero2") -> Path:
    ds = json.loads((REPO / "ds_configs" / f"{zero}.json").read_text())
    ds.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = True
    path = tmp_path / f"{zero}_torch_adam.json"
    path.write_text(json.dumps(ds))
    return path


def command(sets: list[str], ds: Path, nprocs: int) -> list[str]:
    launcher = [str(DEEPSPEED), "--num_gpus", str(nprocs), "--master_port", str(_free_port())] if nprocs > 1 \
        else [sys.executable]
    cmd = launcher + ["launch/finetune.py", "--deepspeed_config", str(ds)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def env() -> dict:
    out = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def run_sets(tiny_data: dict, run_dir: Path) -> list[str]:
    return common_sets(tiny_data, run_dir, None, steps=STEPS) + [
        "checkpoint.every=2", "eval.test=false", "train.val_every=0", "checkpoint.export=true"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "model" / "model.safetensors"))


def step_losses(run_dir: Path) -> dict[int, float]:
    """The loss logged at each step; a step logged twice (before a kill and after the resume) keeps the last."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def rank_pid(launcher_pid: int, local_rank: int) -> int | None:
    """PID of the worker ``--local_rank=N`` below the launcher (found in /proc, no extra tools)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--local_rank={local_rank}".encode() in cmdline and b"launch/finetune.py" in cmdline:
            if _descends_from(int(proc.name), launcher_pid):
                return int(proc.name)
    return None


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_resume_ends_with_the_uninterrupted_weights(tiny_data, tmp_path):
    """Also the exact-resume test: the resumed steps' losses and the final weights are the uninterrupted run's;
    and a resume with another training config is refused, naming the key."""
    ds = REPO / "ds_configs" / "zero2.json"
    reference = tmp_path / "reference"
    done = subprocess.run(command(run_sets(tiny_data, reference), ds, 2), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run_dir = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        job = subprocess.Popen(command(run_sets(tiny_data, run_dir), ds, 2), cwd=REPO, env=env(), stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and max(logged_steps(run_dir), default=0) < 5:
            assert job.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        victim = rank_pid(job.pid, 1)
        assert victim is not None, log.read_text()[-3000:]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        code = job.wait(KILL_BOUND_S)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(10)
    assert code != 0 and time.monotonic() - killed_at < KILL_BOUND_S
    # the survivor names the lost rank (DeepSpeed's launcher reports whichever failed rank it polls first)
    text = log.read_text()
    errors = [line for line in text.splitlines() if "error: rank" in line]
    assert len(errors) == 1 and "error: rank 0: a collective failed" in errors[0], text[-3000:]
    assert "lost rank(s) 1:" in errors[0] and "the last complete checkpoint" in errors[0], errors[0]

    # what a kill between rank 0 and rank 1 finishing a save leaves: rank 0's files, no rank 1 shard, no marker
    ckpt = run_dir / "checkpoints"
    newest = max(d for d in ckpt.glob("step*") if (d / "relalign_complete.json").is_file())
    partial = ckpt / f"step{int(newest.name[4:]) + 2:07d}"
    partial.mkdir(exist_ok=True)
    for f in newest.glob("*rank_0*"):
        (partial / f.name).write_bytes(f.read_bytes())
    for f in partial.glob("*rank_1*"):
        f.unlink()
    (partial / "relalign_complete.json").unlink(missing_ok=True)

    resumed = subprocess.run(command(run_sets(tiny_data, run_dir) + ["checkpoint.resume=true"], ds, 2), cwd=REPO,
                             env=env(), capture_output=True, text=True, timeout=400)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert f"ignoring incomplete checkpoint(s) {partial.name}" in out
    assert f"resumed from checkpoint {ckpt / newest.name}" in out
    a, b = step_losses(reference), step_losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert all(b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-9) for step in a), (a, b)
    expected, got = weights(reference), weights(run_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    changed = subprocess.run(command(run_sets(tiny_data, run_dir) + ["checkpoint.resume=auto", "finetune.margin=0.3"],
                                     ds, 1), cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2, changed.stdout + changed.stderr
    assert "finetune.margin: 0.2 -> 0.3" in changed.stderr and "Traceback" not in changed.stderr


@pytest.mark.slow
def test_a_full_checkpoint_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(tiny_data, tmp_path):
    from pipeline.train.checkpoint import checkpoint_state_dict
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True)
    # one checkpoint of the tiny model is ~2 MB: the first fits, the second does not
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(ckpt)], check=True, timeout=30)
    try:
        done = subprocess.run(command(run_sets(tiny_data, run_dir), torch_adam_ds(tmp_path), 1), cwd=REPO,
                              env=env(), capture_output=True, text=True, timeout=400)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
        assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "checkpoint step0000004 could not be written" in errors[0]
        assert "the last complete checkpoint step0000002 is intact" in errors[0]
        assert complete_tags(ckpt) == [(2, "step0000002")] and not (ckpt / "step0000004").exists()
        assert checkpoint_state_dict(ckpt, "step0000002")   # the intact checkpoint still loads
    finally:
        subprocess.run(["umount", "--lazy", str(ckpt)], timeout=30)   # lazy: detached even while still busy


def _wait_for_step(job: subprocess.Popen, run_dir: Path, log: Path, step: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and max(logged_steps(run_dir), default=0) < step:
        assert job.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    assert max(logged_steps(run_dir), default=0) >= step, log.read_text()[-3000:]


@pytest.mark.slow
def test_a_hung_rank_ends_its_peers_after_the_collective_timeout_naming_it(tiny_data, tmp_path):
    """Rank 1 is stopped (SIGSTOP) mid-run: rank 0's next collective times out after train.collective_timeout_s,
    and it exits with one line naming rank 1 and the checkpoint a relaunch resumes from."""
    timeout_s = 8
    run_dir = tmp_path / "hung"
    log = tmp_path / "hung.log"
    sets = run_sets(tiny_data, run_dir) + ["train.steps=400", f"train.collective_timeout_s={timeout_s}"]
    with open(log, "w") as out:
        job = subprocess.Popen(command(sets, torch_adam_ds(tmp_path), 2), cwd=REPO, env=env(), stdout=out,
                               stderr=subprocess.STDOUT)
    victim = None
    try:
        _wait_for_step(job, run_dir, log, 3)
        survivor, victim = rank_pid(job.pid, 0), rank_pid(job.pid, 1)
        assert survivor and victim, log.read_text()[-3000:]
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        while Path(f"/proc/{survivor}").exists() and time.monotonic() - stopped_at < 90:
            time.sleep(0.2)
        took = time.monotonic() - stopped_at
    finally:
        if victim is not None:
            os.kill(victim, signal.SIGKILL)   # a stopped process would keep the launcher waiting 30 s
        job.wait(60)
    text = log.read_text()
    errors = [line for line in text.splitlines() if "error: rank" in line]
    assert timeout_s <= took < timeout_s + 30, (took, text[-3000:])
    assert len(errors) == 1, text[-3000:]
    assert "error: rank 0: a collective failed" in errors[0] and "lost rank(s) 1:" in errors[0], errors[0]
    newest = complete_tags(run_dir / "checkpoints")[-1][1]
    assert f"continues from {run_dir / 'checkpoints' / newest}, the last complete checkpoint" in errors[0]
    assert job.returncode != 0
    print(errors[0], f"({took:.1f} s after the stop)")


def _stop_inside_a_save(job: subprocess.Popen, ckpt: Path, victim: int, log: Path) -> Path:
    """Stops ``victim`` (rank 1) once rank 0 has written its model states into a new checkpoint, before the
    completion marker; a save that completed before the stop is let go, and the next one tried."""
    from pipeline.train.checkpoint import COMPLETE_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert job.poll() is None, log.read_text()[-3000:]
        saving = [d for d in ckpt.glob("step*") if (d / "mp_rank_00_model_states.pt").exists()
                  and not (d / COMPLETE_FILE).exists()]
        if saving:
            os.kill(victim, signal.SIGSTOP)
            if not (saving[0] / COMPLETE_FILE).exists():
                return saving[0]
            os.kill(victim, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("no save was caught before its completion marker: " + log.read_text()[-2000:])


@pytest.mark.slow
def test_a_job_killed_while_saving_resumes_from_the_previous_checkpoint(tiny_data, tmp_path):
    """A real kill inside the save window, between rank 0 and rank 1 finishing: rank 1 is stopped once rank 0
    has written its part of a new checkpoint, then the whole job is SIGKILLed. The half-written tag has no
    completion marker; the relaunch says it ignores it and resumes from the previous complete checkpoint."""
    from pipeline.train.checkpoint import COMPLETE_FILE, checkpoint_state_dict
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    ckpt = run_dir / "checkpoints"
    sets = run_sets(tiny_data, run_dir) + ["train.steps=40"]
    ds = torch_adam_ds(tmp_path)
    with open(log, "w") as out:
        job = subprocess.Popen(command(sets, ds, 2), cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        _wait_for_step(job, run_dir, log, 3)
        victim = rank_pid(job.pid, 1)
        partial = _stop_inside_a_save(job, ckpt, victim, log)
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
    time.sleep(0.5)   # the killed ranks' files are closed
    assert partial.is_dir() and not (partial / COMPLETE_FILE).exists(), sorted(p.name for p in partial.iterdir())
    print("the kill left", partial.name, "with", sorted(p.name for p in partial.iterdir()))
    previous = complete_tags(ckpt)[-1][1]
    assert int(previous[4:]) < int(partial.name[4:]) and checkpoint_state_dict(ckpt, previous)
    resumed = subprocess.run(command(sets + ["checkpoint.resume=true"], ds, 2), cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=400)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert f"ignoring incomplete checkpoint(s) {partial.name}" in out, out[-3000:]
    assert f"resumed from checkpoint {ckpt / previous}" in out
    assert max(logged_steps(run_dir)) == 40
