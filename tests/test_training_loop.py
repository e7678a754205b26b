"""The shared training loop: exact resume, the LR schedule, TensorBoard logging, run-folder checks."""

import pytest
import torch

from direct_distill.training.checkpoint import load_training_state
from direct_distill.training.loop import CHECKPOINT_NAME, CheckpointMismatch, TrainConfig, cosine_lr, train


class Interrupted(Exception):
    pass


class ToyMethod:
    """Regress a fixed random map with dropout: batch and loss both draw from the global RNG."""

    def __init__(self, init_seed: int, stop_at: int | None = None):
        torch.manual_seed(init_seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(16, 8))
        self.target = torch.randn(8, 8, generator=torch.Generator().manual_seed(123))
        self.modules = {"net": self.net}
        self.stop_at = stop_at

    def batch(self, step):
        x = torch.randn(16, 8)
        return {"x": x, "y": x @ self.target}

    def loss(self, step, batch):
        if step == self.stop_at:
            raise Interrupted
        noise = 0.01 * torch.randn_like(batch["y"])
        return torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"] + noise)


def config(run_dir, **kw):
    return TrainConfig(**{**dict(steps=12, lr=3e-2, warmup_steps=2, run_dir=run_dir, checkpoint_every=4, seed=7), **kw})


def test_interrupted_then_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, accelerator):
    straight = ToyMethod(init_seed=0)
    result = train(straight, config(tmp_path / "straight"), accelerator)
    assert result.step == 12 and result.loss is not None

    with pytest.raises(Interrupted):  # dies during step 9: the last checkpoint is after step 8
        train(ToyMethod(init_seed=0, stop_at=9), config(tmp_path / "resumed"), accelerator)
    step, _ = load_training_state(tmp_path / "resumed" / CHECKPOINT_NAME, {"net": ToyMethod(5).net}, {})
    assert step == 8
    torch.manual_seed(999)  # the caller's RNG state must not matter either
    resumed = ToyMethod(init_seed=1)  # other initial weights: everything must come from the checkpoint
    train(resumed, config(tmp_path / "resumed"), accelerator)

    for (name, a), (_, b) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), name


def test_batches_and_noise_depend_on_seed_and_step_only_not_on_the_callers_rng(accelerator):
    runs = []
    for caller_seed in (1, 2):
        method = ToyMethod(init_seed=0)
        torch.manual_seed(caller_seed)
        train(method, config(None, steps=5), accelerator)
        runs.append(method.net.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_finished_run_resumes_to_a_no_op_that_still_reports_its_last_loss(tmp_path, accelerator):
    method = ToyMethod(0)
    first = train(method, config(tmp_path), accelerator)
    again = ToyMethod(3)
    second = train(again, config(tmp_path), accelerator)  # e.g. re-run to write the file with another --save-dtype
    assert second.loss == first.loss and second.seconds == pytest.approx(first.seconds, abs=0.5)
    assert all(torch.equal(a, b) for a, b in zip(method.net.parameters(), again.net.parameters()))


def test_resuming_with_another_seed_or_step_count_is_refused(tmp_path, accelerator):
    train(ToyMethod(0), config(tmp_path, steps=4), accelerator)
    with pytest.raises(CheckpointMismatch, match="seed 7"):
        train(ToyMethod(0), config(tmp_path, steps=4, seed=8), accelerator)
    # the learning rate anneals over the run's steps: a run of 8 does not continue one of 4 (nor one of 2 end it)
    for steps in (8, 2):
        with pytest.raises(CheckpointMismatch, match=f"written by a run of 4 steps, this run has {steps}; resume "
                                                     "with the same number of steps or use another run folder"):
            train(ToyMethod(0), config(tmp_path, steps=steps), accelerator)


def test_resuming_under_other_method_settings_is_refused_with_each_difference_named(tmp_path, accelerator):
    settings = {"kl_weight": 1e-6, "betas": (0.9, 0.99), "vae": "abc"}
    train(ToyMethod(0), config(tmp_path, steps=4, settings=settings), accelerator)
    finished = (tmp_path / CHECKPOINT_NAME).read_bytes()
    other = dict(settings, kl_weight=0.0, vae="def", extra=1)
    with pytest.raises(CheckpointMismatch) as refused:
        train(ToyMethod(0), config(tmp_path, steps=4, settings=other), accelerator)
    assert str(refused.value) == (f"{tmp_path / CHECKPOINT_NAME}: written by a run with other settings (extra None "
                                  "there, 1 here; kl_weight 1e-06 there, 0.0 here; vae 'abc' there, 'def' here); "
                                  "resume with its settings or use another run folder")
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == finished
    # the same settings resume (a tuple and the list the checkpoint keeps it as are the same value) ...
    assert train(ToyMethod(0), config(tmp_path, steps=4, settings=dict(settings)), accelerator).step == 4
    # ... and a checkpoint that recorded none (older, or a run that gave none) resumes under any
    train(ToyMethod(0), config(tmp_path / "plain", steps=4), accelerator)
    assert train(ToyMethod(0), config(tmp_path / "plain", steps=4, settings=other), accelerator).step == 4


def test_cosine_lr_warms_up_linearly_then_anneals_to_the_floor():
    lrs = [cosine_lr(s, total=10, peak=1.0, warmup=2, final_fraction=0.1) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == 1.0 and all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    assert cosine_lr(10, total=10, peak=1.0, warmup=2, final_fraction=0.1) == pytest.approx(0.1)
    assert cosine_lr(0, total=10, peak=2.0) == 2.0


def test_tensorboard_logs_loss_when_asked(tmp_path, accelerator):
    pytest.importorskip("torch.utils.tensorboard")
    train(ToyMethod(0), config(tmp_path, steps=4, tensorboard=True, log_every=2), accelerator)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_method_without_trainable_parameters_is_refused(accelerator):
    method = ToyMethod(0)
    method.net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(method, TrainConfig(steps=1), accelerator)


class SlowMethod(ToyMethod):
    """Each step takes at least 20 ms, so the recorded seconds have a floor to check."""

    def loss(self, step, batch):
        import time

        time.sleep(0.02)
        return super().loss(step, batch)


def test_wall_clock_is_summed_over_resumed_runs(tmp_path, accelerator):
    straight = train(SlowMethod(init_seed=0), config(None), accelerator)
    assert straight.seconds >= 12 * 0.02

    with pytest.raises(Interrupted):
        train(SlowMethod(init_seed=0, stop_at=9), config(tmp_path / "resumed"), accelerator)
    _, extra = load_training_state(tmp_path / "resumed" / CHECKPOINT_NAME, {"net": ToyMethod(5).net}, {})
    assert extra["seconds"] >= 8 * 0.02  # the first run's time, kept in its checkpoint
    resumed = train(SlowMethod(init_seed=0), config(tmp_path / "resumed"), accelerator)
    assert resumed.seconds >= extra["seconds"] + 4 * 0.02
