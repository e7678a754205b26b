"""diffusers' own DPMSolverMultistepScheduler tests (its tests/schedulers/test_scheduler_dpm_multi.py and the
SchedulerCommonTest that file builds on), run on ExpKarrasScheduler in DPMSolverMultistepScheduler's place.

diffusers' wheel ships no tests, so they are written here in pytest form, one function per diffusers test and
named as there, with diffusers' configuration, dummy model and samples. All of them apply, except:

- test_full_loop_no_noise, test_full_loop_with_noise, test_full_loop_no_noise_thres,
  test_full_loop_with_v_prediction, and the numbers of test_switch: their expected values are sums over runs
  on the uniform ("linspace") timesteps, not on exp-Karras ones. Here the same loops are run on the uniform
  schedule's own sigmas (handed to set_timesteps) and must give diffusers' very numbers, which shows that the
  solver, thresholding, v-prediction and add_noise are diffusers' unchanged; test_switch keeps its other half
  (switching through the other solvers' configs and back changes nothing).
- test_full_loop_with_karras_and_v_prediction, test_full_loop_with_lu_and_v_prediction, test_beta_sigmas,
  test_exponential_sigmas: they ask for another sigma spacing (use_karras_sigmas=True, ...); here the
  constructor must refuse each with one clear error.
- test_custom_timesteps: diffusers re-runs a schedule from its integer model timesteps, which are the uniform
  schedule itself; exp-Karras steps sit at fractional timesteps that the integer ones only approximate, so
  here the custom timesteps are the exact (fractional) ones, and both runs must agree.
- test_trained_betas: diffusers pairs 2 trained betas with num_train_timesteps=1000, which ExpKarrasScheduler
  refuses as a malformed config; here the 2 betas come with num_train_timesteps=2.
- test_compatibles skips DPMSolverSDEScheduler where torchsde is not installed (diffusers' own test fails
  there for DPMSolverMultistepScheduler too); test_from_save_pretrained is skipped by diffusers as well.
"""

import importlib.util
import inspect
import warnings

import numpy as np
import pytest
import torch
from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                       UniPCMultistepScheduler)

from direct_distill.schedulers import ExpKarrasScheduler, exp_karras_timesteps

NUM_INFERENCE_STEPS = 25  # diffusers' forward_default_kwargs


def scheduler_config(**overrides):
    config = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
                  prediction_type="epsilon", thresholding=False, sample_max_value=1.0, algorithm_type="dpmsolver++",
                  solver_type="midpoint", lower_order_final=False, euler_at_final=False,
                  lambda_min_clipped=-float("inf"), variance_type=None, final_sigmas_type="sigma_min")
    return {**config, **overrides}


def dummy_sample():
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _ramp_sample(flip: bool):
    """diffusers' deterministic samples: 0 .. 1 in (channel, h, w, batch) order, or reversed."""
    n = 4 * 3 * 8 * 8
    values = torch.arange(n)
    values = values.flip(-1) if flip else values
    return (values / n).reshape(3, 8, 8, 4).permute(3, 0, 1, 2)


def dummy_sample_deter():
    return _ramp_sample(flip=False)


def dummy_noise_deter():
    return _ramp_sample(flip=True)


def dummy_model(sample, t):
    t = t.reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.dtype) if isinstance(t, torch.Tensor) else t
    return sample * t / (t + 1)


def dummy_past_residuals(residual):
    return [residual + 0.2, residual + 0.15, residual + 0.10]


def reloaded(scheduler, tmp_path):
    scheduler.save_config(tmp_path)
    return ExpKarrasScheduler.from_pretrained(tmp_path)


def check_over_configs(tmp_path, time_step=0, **config):
    """A scheduler and its save/load copy, given the same past residuals, step identically."""
    sample = dummy_sample()
    residual = 0.1 * sample
    scheduler = ExpKarrasScheduler(**scheduler_config(**config))
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    scheduler.model_outputs = dummy_past_residuals(residual)[:scheduler.config.solver_order]
    new = reloaded(scheduler, tmp_path)
    new.set_timesteps(NUM_INFERENCE_STEPS)
    new.model_outputs = dummy_past_residuals(residual)[:new.config.solver_order]
    output = new_output = sample
    for i in range(time_step, time_step + scheduler.config.solver_order + 1):
        t = new.timesteps[i]
        output = scheduler.step(residual, t, output).prev_sample
        new_output = new.step(residual, t, new_output).prev_sample
        assert torch.sum(torch.abs(output - new_output)) < 1e-5, "Scheduler outputs are not identical"


def check_over_forward(tmp_path, num_inference_steps, time_step=0):
    sample = dummy_sample()
    residual = 0.1 * sample
    scheduler = ExpKarrasScheduler(**scheduler_config())
    scheduler.set_timesteps(num_inference_steps)
    scheduler.model_outputs = dummy_past_residuals(residual)[:scheduler.config.solver_order]
    new = reloaded(scheduler, tmp_path)
    new.set_timesteps(num_inference_steps)
    new.model_outputs = dummy_past_residuals(residual)[:new.config.solver_order]
    t = new.timesteps[time_step]
    output = scheduler.step(residual, t, sample).prev_sample
    new_output = new.step(residual, t, sample).prev_sample
    assert torch.sum(torch.abs(output - new_output)) < 1e-5, "Scheduler outputs are not identical"


def run_loop(scheduler, sample=None):
    sample = dummy_sample_deter() if sample is None else sample
    generator = torch.manual_seed(0)
    for t in scheduler.timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample, generator=generator).prev_sample
    return sample


def full_loop(scheduler=None, **config):
    scheduler = scheduler or ExpKarrasScheduler(**scheduler_config(**config))
    scheduler.set_timesteps(10)
    return run_loop(scheduler)


def uniform_full_loop(**config):
    """diffusers' full loop, on the sigmas DPMSolverMultistepScheduler takes for its uniform timesteps."""
    reference = DPMSolverMultistepScheduler(**scheduler_config(**config))
    reference.set_timesteps(10)
    scheduler = ExpKarrasScheduler(**scheduler_config(**config))
    scheduler.set_timesteps(sigmas=reference.sigmas[:-1])  # the final sigma_min follows from final_sigmas_type
    assert scheduler.timesteps.tolist() == reference.timesteps.tolist()
    return scheduler


# --- SchedulerCommonTest ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")  # other schedulers hand torch tensors to numpy
def test_compatibles():
    scheduler = ExpKarrasScheduler(**scheduler_config())
    assert all(c is not None for c in scheduler.compatibles)
    compatibles = [c for c in scheduler.compatibles
                   if c.__name__ != "DPMSolverSDEScheduler" or importlib.util.find_spec("torchsde")]
    assert len(compatibles) >= 13
    for cls in compatibles:
        other = cls.from_config(scheduler.config)
        assert other is not None
        if "sigma_data" in other.config:  # EDMEulerScheduler: an EDM model's continuous sigmas, no DDPM table
            with pytest.raises(ValueError, match="describes an EDM model"):
                ExpKarrasScheduler.from_config(other.config)
            continue
        new = ExpKarrasScheduler.from_config(other.config)
        # The config survives the round trip; only keys that are not ExpKarrasScheduler arguments differ (and
        # steps_offset, which offsets nothing here: the other class's default comes back).
        kept = ("_use_default_values", "steps_offset")
        assert ({k: v for k, v in new.config.items() if k in scheduler.config and k not in kept}
                == {k: v for k, v in scheduler.config.items() if k not in kept}), cls.__name__
        extra = {k for k in new.config if k not in scheduler.config}
        assert not extra & set(inspect.signature(ExpKarrasScheduler.__init__).parameters), cls.__name__


def test_from_pretrained(tmp_path):
    scheduler = ExpKarrasScheduler(**scheduler_config())
    scheduler.save_pretrained(tmp_path)
    new = ExpKarrasScheduler.from_pretrained(tmp_path)
    config = dict(scheduler.config)
    del config["_use_default_values"]
    assert config == new.config


def test_scheduler_outputs_equivalence():
    scheduler = ExpKarrasScheduler(**scheduler_config())
    sample = dummy_sample()
    residual = 0.1 * sample
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    t = scheduler.timesteps[0]
    as_dict = scheduler.step(residual, t, sample, generator=torch.manual_seed(0))
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    as_tuple = scheduler.step(residual, t, sample, return_dict=False, generator=torch.manual_seed(0))
    torch.testing.assert_close(as_tuple[0], as_dict.prev_sample, atol=1e-5, rtol=0)


def test_scheduler_public_api():
    scheduler = ExpKarrasScheduler(**scheduler_config())
    assert hasattr(scheduler, "init_noise_sigma") and hasattr(scheduler, "step")
    sample = dummy_sample()
    assert scheduler.scale_model_input(sample, 0.0).shape == sample.shape


def test_add_noise_device():
    scheduler = ExpKarrasScheduler(**scheduler_config())
    scheduler.set_timesteps(50)
    sample = scheduler.scale_model_input(dummy_sample(), 0.0)
    noised = scheduler.add_noise(sample, torch.randn(sample.shape), scheduler.timesteps[5][None])
    assert noised.shape == sample.shape


def test_deprecated_kwargs():
    has_kwargs = "kwargs" in inspect.signature(ExpKarrasScheduler.__init__).parameters
    assert has_kwargs == (len(ExpKarrasScheduler._deprecated_kwargs) > 0)


def test_trained_betas(tmp_path):
    scheduler = ExpKarrasScheduler(**scheduler_config(num_train_timesteps=2), trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    new = ExpKarrasScheduler.from_pretrained(tmp_path)
    assert scheduler.betas.tolist() == new.betas.tolist()


def test_getattr_is_correct():
    scheduler = ExpKarrasScheduler(**scheduler_config())
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scheduler.dummy_attribute == 5 and getattr(scheduler, "save_pretrained") == scheduler.save_pretrained
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError, match="'ExpKarrasScheduler' object has no attribute 'does_not_exist'"):
        scheduler.does_not_exist


# --- DPMSolverMultistepSchedulerTest ----------------------------------------------------------------------


def test_step_shape():
    scheduler = ExpKarrasScheduler(**scheduler_config())
    sample = dummy_sample()
    residual = 0.1 * sample
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    scheduler.model_outputs = dummy_past_residuals(residual)[:scheduler.config.solver_order]
    output_0 = scheduler.step(residual, scheduler.timesteps[5], sample).prev_sample
    output_1 = scheduler.step(residual, scheduler.timesteps[6], sample).prev_sample
    assert output_0.shape == sample.shape == output_1.shape


@pytest.mark.parametrize("num_train_timesteps", [25, 50, 100, 999, 1000])
def test_timesteps(tmp_path, num_train_timesteps):
    check_over_configs(tmp_path, num_train_timesteps=num_train_timesteps)


def test_thresholding(tmp_path):
    check_over_configs(tmp_path, thresholding=False)
    for order in (1, 2, 3):
        for solver_type in ("midpoint", "heun"):
            for threshold in (0.5, 1.0, 2.0):
                for prediction_type in ("epsilon", "sample"):
                    check_over_configs(tmp_path, thresholding=True, prediction_type=prediction_type,
                                       sample_max_value=threshold, algorithm_type="dpmsolver++", solver_order=order,
                                       solver_type=solver_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_type(tmp_path, prediction_type):
    check_over_configs(tmp_path, prediction_type=prediction_type)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"])
def test_solver_order_and_type(tmp_path, algorithm_type):
    for solver_type in ("midpoint", "heun"):
        for order in (1, 2, 3):
            for prediction_type in ("epsilon", "sample"):
                if algorithm_type.startswith("sde-"):
                    if order == 3:
                        continue
                else:
                    check_over_configs(tmp_path, solver_order=order, solver_type=solver_type,
                                       prediction_type=prediction_type, algorithm_type=algorithm_type)
                sample = full_loop(solver_order=order, solver_type=solver_type, prediction_type=prediction_type,
                                   algorithm_type=algorithm_type)
                assert not torch.isnan(sample).any(), "Samples have nan numbers"


@pytest.mark.parametrize("setting", [True, False])
def test_lower_order_final(tmp_path, setting):
    check_over_configs(tmp_path, lower_order_final=setting)


@pytest.mark.parametrize("setting", [True, False])
def test_euler_at_final(tmp_path, setting):
    check_over_configs(tmp_path, euler_at_final=setting)


@pytest.mark.parametrize("setting", [-float("inf"), -5.1])
def test_lambda_min_clipped(tmp_path, setting):
    check_over_configs(tmp_path, lambda_min_clipped=setting)


@pytest.mark.parametrize("setting", [None, "learned_range"])
def test_variance_type(tmp_path, setting):
    check_over_configs(tmp_path, variance_type=setting)


@pytest.mark.parametrize("num_inference_steps", [1, 2, 3, 5, 10, 50, 100, 999, 1000])
def test_inference_steps(tmp_path, num_inference_steps):
    check_over_forward(tmp_path, num_inference_steps)


@pytest.mark.parametrize("setting", [True, False])
def test_rescale_betas_zero_snr(tmp_path, setting):
    check_over_configs(tmp_path, rescale_betas_zero_snr=setting)


def test_full_loop_no_noise():
    result_mean = torch.mean(torch.abs(run_loop(uniform_full_loop())))
    assert abs(result_mean.item() - 0.3301) < 1e-3


def test_full_loop_with_noise():
    scheduler = uniform_full_loop()
    timesteps = scheduler.timesteps[5 * scheduler.order:]
    sample = scheduler.add_noise(dummy_sample_deter(), dummy_noise_deter(), timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample).prev_sample
    assert abs(torch.sum(torch.abs(sample)).item() - 318.4111) < 1e-2
    assert abs(torch.mean(torch.abs(sample)).item() - 0.4146) < 1e-3


def test_full_loop_no_noise_thres():
    scheduler = uniform_full_loop(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5)
    assert abs(torch.mean(torch.abs(run_loop(scheduler))).item() - 1.1364) < 1e-3


def test_full_loop_with_v_prediction():
    scheduler = uniform_full_loop(prediction_type="v_prediction")
    assert abs(torch.mean(torch.abs(run_loop(scheduler))).item() - 0.2251) < 1e-3


@pytest.mark.parametrize("flag", ["use_karras_sigmas", "use_lu_lambdas", "use_beta_sigmas", "use_exponential_sigmas"])
def test_other_spacings_are_refused(flag):
    """diffusers' test_full_loop_with_karras_and_v_prediction, ..._with_lu_..., test_beta_sigmas and
    test_exponential_sigmas ask for these spacings."""
    with pytest.raises(ValueError, match=f"{flag}=True asks for another sigma spacing"):
        ExpKarrasScheduler(**scheduler_config(prediction_type="v_prediction", **{flag: True}))


def test_switch():
    scheduler = ExpKarrasScheduler(**scheduler_config())
    before = full_loop(scheduler=scheduler)
    for cls in (DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler, ExpKarrasScheduler):
        scheduler = cls.from_config(scheduler.config)
    assert isinstance(scheduler, ExpKarrasScheduler) and scheduler.config.final_sigmas_type == "sigma_min"
    torch.testing.assert_close(full_loop(scheduler=scheduler), before, rtol=0, atol=0)
    assert abs(torch.mean(torch.abs(run_loop(uniform_full_loop()))).item() - 0.3301) < 1e-3


def test_fp16_support():
    scheduler = ExpKarrasScheduler(**scheduler_config(thresholding=True, dynamic_thresholding_ratio=0))
    scheduler.set_timesteps(10)
    sample = dummy_sample_deter().half()
    for t in scheduler.timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample).prev_sample
    assert sample.dtype == torch.float16


def test_duplicated_timesteps():
    scheduler = ExpKarrasScheduler(**scheduler_config())
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    assert len(scheduler.timesteps) == scheduler.num_inference_steps


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("final_sigmas_type", ["sigma_min", "zero"])
def test_custom_timesteps(algorithm_type, prediction_type, final_sigmas_type):
    config = scheduler_config(algorithm_type=algorithm_type, prediction_type=prediction_type,
                              final_sigmas_type=final_sigmas_type)
    sample = full_loop(**config)
    custom = ExpKarrasScheduler(**config)
    # Ending at sigma_min, the exp-Karras grid has one point more, its last (t = 0) being the end point.
    exact = exp_karras_timesteps(11 if final_sigmas_type == "sigma_min" else 10, custom.config.exp_karras_p)[:10]
    custom.set_timesteps(timesteps=exact)
    assert torch.sum(torch.abs(sample - run_loop(custom))) < 1e-5
