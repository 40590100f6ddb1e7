"""Preemption: the handler is in place before torch is imported, the signal only sets a flag, the exit code after
a stop, the world-size check on resume, and a stop during the final test resuming at that phase (a real
one-process DeepSpeed run). The full Slurm cycle is tests/test_slurm.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import stopping
from pipeline.errors import UserError
from test_training import common_sets

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_the_stopping_module_imports_nothing_heavy():
    done = _python("""
        import sys
        import pipeline.stopping
        print(sorted(m for m in ("torch", "deepspeed", "numpy", "mlflow") if m in sys.modules))""")
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("entry", ["finetune", "pretrain"])
def test_the_entry_points_install_the_handler_before_torch_is_imported(entry):
    done = _python(f"""
        import builtins, runpy, signal, sys
        real_import, seen = builtins.__import__, {{}}
        def spying_import(name, *args, **kwargs):
            if name.split(".")[0] == "torch" and "handler" not in seen:
                seen["handler"] = signal.getsignal(signal.SIGUSR1)
            return real_import(name, *args, **kwargs)
        builtins.__import__ = spying_import
        sys.argv = ["launch/{entry}.py", "--print-config"]
        try:
            runpy.run_path("launch/{entry}.py", run_name="__main__")
        except SystemExit:
            pass
        print(callable(seen["handler"]))""")
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]


def test_the_signal_only_sets_the_flag_even_when_the_launcher_ignored_it():
    done = _python("""
        import os, signal
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)   # as `trap "" USR1` leaves it for the workers
        from pipeline.stopping import install_signal_handler
        flag = install_signal_handler()
        os.kill(os.getpid(), signal.SIGUSR1)
        print(flag.is_set(), flag.reason)""")
    assert done.stdout.strip() == "True signal SIGUSR1", done.stderr


def test_after_a_stop_outside_slurm_the_exit_code_asks_for_a_requeue(capsys):
    assert stopping.exit_after_stop("finetune", "signal SIGUSR1", True, env={"PATH": ""}) == 75
    assert "resume with --resume" in capsys.readouterr().out


def test_under_slurm_without_scontrol_every_rank_exits_with_the_requeue_code(capsys):
    env = {"SLURM_JOB_ID": "42", "PATH": ""}
    assert stopping.exit_after_stop("finetune", "signal SIGUSR1", True, env=env) == stopping.REQUEUE_EXIT_CODE
    assert "scontrol is not on PATH" in capsys.readouterr().err
    assert stopping.exit_after_stop("finetune", "signal SIGUSR1", False, env=env) == stopping.REQUEUE_EXIT_CODE


def test_a_checkpoint_of_another_world_size_is_refused_with_how_to_go_on(tmp_path):
    from pipeline.train.checkpoint import COMPLETE_FILE, check_resume_world_size
    (tmp_path / "step0000010").mkdir()
    (tmp_path / "step0000010" / COMPLETE_FILE).write_text(json.dumps({"step": 10, "world_size": 2}))
    check_resume_world_size((tmp_path, "step0000010"), 2)
    with pytest.raises(UserError, match="written by 2 ranks but this job has 4: resume with 2 ranks"):
        check_resume_world_size((tmp_path, "step0000010"), 4)


STOP_AFTER_TEST = """
    import json, sys
    from pathlib import Path
    from pipeline.stopping import StopFlag
    from pipeline.train.finetune import FINISH_STATE, finetune
    from pipeline.train.runtime import prepare

    class StopOnceTested(StopFlag):
        # what a preemption signal arriving during the final test evaluation does, without the race
        def is_set(self):
            states = list(run_dir.glob("checkpoints/*/" + FINISH_STATE))
            if states and "test" in json.loads(states[0].read_text()) and self.reason is None:
                self.request("signal SIGUSR1")
            return super().is_set()

    sets = json.loads(sys.argv[1])
    cfg, ds = prepare("finetune", "launch/configs/demo_tiny.yaml", sets, "ds_configs/zero0.json")
    run_dir = Path(cfg.run_dir)
    stop = StopOnceTested() if sys.argv[2] == "stop" else StopFlag()
    finetune(cfg, ds, stop)
    print("HONOURED", stop.honoured)
"""


@pytest.mark.slow
def test_a_stop_during_the_final_test_resumes_at_the_export_not_at_training(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    sets = common_sets(tiny_data, run_dir, None, steps=2) + ["checkpoint.resume=auto", "train.val_every=0"]
    ds = json.loads((REPO / "ds_configs" / "zero0.json").read_text())
    ds.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    code = textwrap.dedent(STOP_AFTER_TEST).replace("ds_configs/zero0.json", str(tmp_path / "ds.json"))

    def attempt(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(sets), mode], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    first = attempt("stop")
    assert "HONOURED signal SIGUSR1" in first and "after the test evaluation" in first
    assert "test (weights of checkpoint" in first and not (run_dir / "model").exists()
    second = attempt("resume")
    assert "resumed from checkpoint" in second and "HONOURED None" in second
    assert "test (weights of checkpoint" not in second   # the test phase is not run again
    assert "[finetune] step" not in second                # nor any training step
    assert (run_dir / "model" / "model.safetensors").is_file()
