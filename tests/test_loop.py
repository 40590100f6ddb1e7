"""The one training loop (pipeline/train/loop.py), in process with a fake engine: micro-batch bookkeeping
under gradient accumulation (scalars averaged, one generator per micro-batch), cadences, the stop flag, and
both stages going through it. The real DeepSpeed engine is covered by tests/test_training.py."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.train import loop
from pipeline.train import runtime as T
from pipeline.train.runtime import Run


class FakeEngine:
    """The engine attributes the loop uses; records the call order."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(1, 1)
        self.calls: list[str] = []

    def train(self) -> None:
        self.calls.append("train")

    def backward(self, loss: torch.Tensor) -> None:
        self.calls.append("backward")

    def step(self) -> None:
        self.calls.append("step")

    def get_lr(self) -> list[float]:
        return [0.5]

    def get_global_grad_norm(self) -> float:
        return 2.0


class FakeTracker:
    run_id = None

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, values: dict, step: int) -> None:
        self.logged.append((step, dict(values)))


class FakeStream:
    """Batches of 2 rows numbered start, start + 1, ... in ``input_ids``."""

    def __init__(self, start: int = 0) -> None:
        self.counter = itertools.count(start)
        self.skipped: dict[str, int] = {}

    def __next__(self) -> dict:
        n = next(self.counter)
        return {"input_ids": torch.full((2, 3), n)}

    def state(self) -> dict:
        return {"epoch": 0, "batches": 0}


class RecordingStep:
    """A step function whose loss is the batch number; records each call's generator draw."""

    def __init__(self, stop: loop.StopFlag | None = None, stop_at: int | None = None) -> None:
        self.calls: list[tuple[int, int, int]] = []   # (step, batch number, draw)
        self.stop, self.stop_at = stop, stop_at

    def __call__(self, batch: dict, step: int, generator: torch.Generator):
        number = int(batch["input_ids"][0, 0])
        draw = int(torch.randint(2 ** 62, (1,), generator=generator))
        self.calls.append((step, number, draw))
        if self.stop is not None and step + 1 == self.stop_at:
            self.stop.request("preempted")
        return torch.tensor(float(number)), {"loss": float(number), "draw_parity": float(draw % 2)}


def make_run(tmp_path, *sets: str) -> Run:
    cfg = load_config(None, ["data.train=unused", "train.micro_batch_size=2", "train.grad_accum=1",
                             "train.log_every=1", "train.steps=4", *sets])
    return Run(cfg=cfg, ds_config={}, stage="finetune", run_dir=tmp_path, device=torch.device("cpu"))


def make_hooks(step_fn, saves: list[int], validations: list[int] | None = None) -> loop.StageHooks:
    stream = FakeStream()

    def save(step: int) -> str:
        saves.append(step)
        return f"step{step:07d}"

    return loop.StageHooks(step_fn=step_fn, next_batch=lambda step, micro: next(stream), save=save,
                           skipped=lambda: stream.skipped,
                           validate=None if validations is None else validations.append)


def jsonl_rows(run: Run) -> list[dict]:
    return [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]


def draw(cfg, step: int, salt: int) -> int:
    return int(torch.randint(2 ** 62, (1,), generator=T.step_generator(cfg, step, 0, salt=salt)))


# ----------------------------------------------------------------------------- micro-batches

def test_grad_accum_averages_scalars_and_salts_the_generator_per_micro_batch(tmp_path):
    run = make_run(tmp_path, "train.grad_accum=2", "train.steps=3")
    engine, tracker, step_fn = FakeEngine(), FakeTracker(), RecordingStep()
    result = loop.train(run, engine, make_hooks(step_fn, []), tracker, start_step=0)
    assert result.step == 3 and result.stopped is None
    assert engine.calls == ["train"] + ["backward", "step"] * 6
    rows = jsonl_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # batches 0+1, 2+3, 4+5: the mean over both micro-batches, not the last one
    assert [r["loss"] for r in rows] == [0.5, 2.5, 4.5]
    assert rows[0]["lr"] == 0.5 and rows[0]["grad_norm"] == 2.0 and "samples_per_s" in rows[0]
    assert [s for s, _ in tracker.logged] == [1, 2, 3] and tracker.logged[-1][1]["loss"] == 4.5
    assert result.last_logged["loss"] == 4.5
    draws = [d for _, _, d in step_fn.calls]
    assert len(set(draws)) == 6
    # micro-batch i draws from step_generator(salt=i); salt 0 is today's unsalted generator of the step
    assert draws == [draw(run.cfg, step, micro) for step in range(3) for micro in range(2)]
    assert draws[0::2] == [int(torch.randint(2 ** 62, (1,), generator=T.step_generator(run.cfg, s, 0)))
                           for s in range(3)]


def test_mean_scalars_averages_each_key_over_the_rows_that_hold_it():
    assert loop.mean_scalars([{"a": 1.0, "b": 4.0}, {"a": 3.0}]) == {"a": 2.0, "b": 4.0}


def test_log_window_averages_optimizer_steps_between_logs(tmp_path):
    run = make_run(tmp_path, "train.log_every=2", "train.steps=3")
    loop.train(run, FakeEngine(), make_hooks(RecordingStep(), []), FakeTracker(), start_step=0)
    rows = jsonl_rows(run)
    assert [(r["step"], r["loss"]) for r in rows] == [(2, 0.5), (3, 2.0)]   # the last step always logs


def test_validation_and_checkpoint_cadence_skip_the_last_step(tmp_path):
    run = make_run(tmp_path, "train.steps=4", "train.val_every=2", "checkpoint.every=1")
    saves, validations = [], []
    hooks = make_hooks(RecordingStep(), saves, validations)
    loop.train(run, FakeEngine(), hooks, FakeTracker(), start_step=1)
    assert saves == [2, 3] and validations == [2]   # step 4 is the stage's finish


# ----------------------------------------------------------------------------- stop flag

def test_stop_flag_saves_and_returns_after_that_step(tmp_path):
    run = make_run(tmp_path, "train.steps=6", "train.log_every=2", "train.grad_accum=2")
    stop, saves = loop.StopFlag(), []
    step_fn = RecordingStep(stop, stop_at=3)
    result = loop.train(run, FakeEngine(), make_hooks(step_fn, saves), FakeTracker(), start_step=0, stop=stop)
    assert (result.step, result.stopped) == (3, "preempted")
    assert saves == [3]
    assert [s for s, _, _ in step_fn.calls] == [0, 0, 1, 1, 2, 2]   # no micro-step of step 4
    # the window since the last log (step 3 alone) is logged before returning
    assert [(r["step"], r["loss"]) for r in jsonl_rows(run)] == [(2, 1.5), (3, 4.5)]
    assert result.last_logged["loss"] == 4.5


def test_stop_at_a_checkpoint_step_saves_once(tmp_path):
    run = make_run(tmp_path, "train.steps=6", "checkpoint.every=3")
    stop, saves = loop.StopFlag(), []
    result = loop.train(run, FakeEngine(), make_hooks(RecordingStep(stop, stop_at=3), saves), FakeTracker(),
                        start_step=0, stop=stop)
    assert result.step == 3 and saves == [3]


def test_stop_at_the_last_step_finishes_normally(tmp_path):
    run = make_run(tmp_path, "train.steps=3")
    stop, saves = loop.StopFlag(), []
    result = loop.train(run, FakeEngine(), make_hooks(RecordingStep(stop, stop_at=3), saves), FakeTracker(),
                        start_step=0, stop=stop)
    assert (result.step, result.stopped, saves) == (3, None, [])


def test_stop_flag_keeps_the_first_reason():
    stop = loop.StopFlag()
    assert not stop.is_set()
    stop.request("SIGTERM")
    stop.request("fault")
    assert stop.is_set() and stop.reason == "SIGTERM"


# ----------------------------------------------------------------------------- both stages use the loop

@pytest.fixture
def loop_spy(monkeypatch):
    calls = []
    real = loop.train

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train", spy)
    return calls


class FakePool:
    def __init__(self) -> None:
        self.added: list[int] = []

    def add(self, batch: dict) -> None:
        self.added.append(int(batch["input_ids"][0, 0]))


def test_finetune_job_trains_through_the_loop_with_its_pool(tmp_path, loop_spy):
    from pipeline.train.finetune import FinetuneJob
    run = make_run(tmp_path, "train.grad_accum=2", "train.steps=2")
    job = FinetuneJob.__new__(FinetuneJob)   # the job's training glue without a model, loader or DeepSpeed
    job.run, job.cfg, job.engine, job.tracker, job.step = run, run.cfg, FakeEngine(), FakeTracker(), 0
    job.stream, job.pool, job.step_fn = FakeStream(), FakePool(), RecordingStep()
    result = job.train()
    assert len(loop_spy) == 1 and job.step == result.step == 2
    assert job.pool.added == [0, 1, 2, 3]   # every micro-batch joins the candidate pool
    assert [r["loss"] for r in jsonl_rows(run)] == [0.5, 2.5]
    assert len({d for _, _, d in job.step_fn.calls}) == 4


def test_pretrain_job_trains_through_the_loop_and_averages_task_scalars(tmp_path, loop_spy):
    from pipeline.train.pretrain import PretrainJob
    run = make_run(tmp_path, "train.grad_accum=2", "train.steps=2",
                   "pretrain.tasks={mlm: 0.0, itm: 1.0, itc: 0.0}")
    job = PretrainJob.__new__(PretrainJob)
    job.run, job.cfg, job.engine, job.tracker, job.step = run, run.cfg, FakeEngine(), FakeTracker(), 0
    job.streams, job.weights = [FakeStream(), FakeStream(100)], [1.0, 1.0]
    generators = []

    def task_loss(task, batch, generator):
        generators.append(int(torch.randint(2 ** 62, (1,), generator=generator)))
        number = float(batch["input_ids"][0, 0])
        return torch.tensor(number), {"itm_acc": number / 10}

    job.task_loss = task_loss
    result = job.train()
    assert len(loop_spy) == 1 and result.step == 2
    rows = jsonl_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["itm_loss"] == row["loss"] and row["itm_acc"] == pytest.approx(row["loss"] / 10)
        assert not any(k.endswith(("_sum", "_steps")) for k in row)
    assert len(set(generators)) == 4


def test_progress_prints_plain_lines_when_not_a_terminal(capsys):
    bar = loop.LineProgress("finetune", total=10, initial=2, enabled=True)
    bar.update(1)
    bar.set_postfix(loss="0.5000", samples_per_s="12.0")
    silent = loop.LineProgress("finetune", total=10, initial=0, enabled=False)
    silent.set_postfix(loss="1.0")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[finetune] step 3/10 loss=0.5000 samples_per_s=12.0 ")
    assert "\r" not in lines[0]


# ----------------------------------------------------------------------------- non-finite loss

class NanAtStep(RecordingStep):
    """Loss NaN for the batch numbered ``bad``; the batches carry sample keys."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def __call__(self, batch: dict, step: int, generator: torch.Generator):
        loss, scalars = super().__call__(batch, step, generator)
        if int(batch["input_ids"][0, 0]) == self.bad:
            return torch.tensor(float("nan")), {"loss": float("nan")}
        return loss, scalars


def keyed_hooks(step_fn) -> loop.StageHooks:
    stream = FakeStream()

    def next_batch(step: int, micro: int) -> dict:
        batch = next(stream)
        n = int(batch["input_ids"][0, 0])
        return {**batch, "image_id": torch.tensor([n, n]), "keys": [f"shard0/{n:04d}a", f"shard0/{n:04d}b"]}

    return loop.StageHooks(step_fn=step_fn, next_batch=next_batch, save=lambda step: "t",
                           skipped=lambda: stream.skipped)


def test_a_nan_loss_stops_the_run_before_its_update_naming_the_samples(tmp_path):
    run, engine = make_run(tmp_path), FakeEngine()
    with pytest.raises(loop.NonFiniteLoss, match=r"step 3: the loss is not finite.*shard0/0002a, shard0/0002b"):
        loop.train(run, engine, keyed_hooks(NanAtStep(bad=2)), FakeTracker(), start_step=0)
    assert engine.calls == ["train"] + ["backward", "step"] * 2   # step 3's update never ran


def test_with_nonfinite_skip_the_step_is_skipped_counted_and_the_run_goes_on(tmp_path, capsys):
    run, engine = make_run(tmp_path, "train.nonfinite=skip"), FakeEngine()
    result = loop.train(run, engine, keyed_hooks(NanAtStep(bad=2)), FakeTracker(), start_step=0)
    assert result.step == 4 and engine.calls == ["train"] + ["backward", "step"] * 3
    rows = jsonl_rows(run)
    assert rows[2]["nonfinite_skipped_steps"] == 1.0 and "loss" not in rows[2]   # the NaN is never logged
    assert [r["loss"] for r in rows if "loss" in r] == [0.0, 1.0, 3.0]
    assert "step 3: non-finite loss skipped (no update); samples: shard0/0002a, shard0/0002b" in capsys.readouterr().out


def test_nonfinite_skip_with_gradient_accumulation_is_refused_before_any_step(tmp_path):
    from pipeline.errors import UserError
    run, engine = make_run(tmp_path, "train.nonfinite=skip", "train.grad_accum=2"), FakeEngine()
    with pytest.raises(UserError, match="train.nonfinite=skip needs one micro-batch per step"):
        loop.train(run, engine, keyed_hooks(NanAtStep(bad=2)), FakeTracker(), start_step=0)
    assert engine.calls == []


def test_step_generators_of_the_largest_seed_do_not_overflow():
    """The seed x step mix passed torch's 64-bit seed range from seed ~4.5 million on (a traceback at step 1)."""
    from pipeline.config import load_config
    small = load_config(None, ["data.synthetic={}", "seed=7"])
    largest = load_config(None, ["data.synthetic={}", f"seed={2 ** 32 - 1}"])
    draws = {int(torch.randint(2 ** 62, (1,), generator=T.step_generator(largest, step, rank)))
             for step in (0, 10 ** 6) for rank in (0, 63)}
    assert len(draws) == 4
    before = ((7 * 1_000_003 + 5) * 65_537 + 1) * 31 + 2   # below 2**63: the same generator as before the fix
    assert torch.equal(torch.rand(3, generator=T.step_generator(small, 5, 1, salt=2)),
                       torch.rand(3, generator=torch.Generator().manual_seed(before)))
