"""TCD's strategic stochastic sampling as a k-diffusion sampler (VE latents, a denoiser model), for ComfyUI."""

from __future__ import annotations

import torch
from tqdm.auto import trange

from .noise import sigma_to_model_timestep


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
               gamma: float = 0.3, sigma_table: torch.Tensor):
    """Trajectory Consistency Distillation, strategic stochastic sampling (Zheng et al. 2024, arXiv:2402.19159,
    Algorithm 4). From t to the next timestep t': predict x0 and eps at t, move deterministically to
    s = floor((1 - gamma) t') (Eq. 14: x_s = x0 + sigma_s eps in VE terms), then forward-diffuse from s back up to t'
    with fresh noise (x_t' = x_s + sqrt(sigma_t'^2 - sigma_s^2) z). gamma = 0 is the deterministic DDIM/Euler step;
    gamma = 1 jumps to the data end every step. The last step (to sigma 0) returns the prediction itself.

    Args:
        model: a k-diffusion denoiser, ``model(x, sigma, **extra_args) -> x0``.
        x: the initial VE latent (noise times ``sigmas[0]``).
        sigmas: descending sigmas ending in 0; each must be a sigma of ``sigma_table`` (the timestep is looked up).
        noise_sampler: ``f(sigma, sigma_next) -> unit noise``; by default Gaussian, seeded by ``extra_args["seed"]``.
        gamma: the stochasticity, in [0, 1] (diffusers' ``eta``).
        sigma_table: the model's VE sigma of every training timestep, ascending.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD gamma must be in [0, 1], got {gamma!r}")
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        generator = torch.Generator(device=x.device)
        if extra_args.get("seed") is not None:
            generator.manual_seed(extra_args["seed"])
        else:
            generator.seed()
        noise_sampler = lambda sigma, sigma_next: torch.randn(x.shape, dtype=x.dtype, device=x.device,  # noqa: E731
                                                              generator=generator)
    table = torch.as_tensor(sigma_table).detach().to("cpu", torch.float64)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        eps = (x - denoised) / sigmas[i]
        t_next = int(sigma_to_model_timestep(float(sigmas[i + 1]), table))
        # below the table's smallest sigma t_next is 0 and table[0] lies above sigma_next: s never passes it
        sigma_s = min(float(table[int((1 - gamma) * t_next)]), float(sigmas[i + 1]))
        x = denoised + sigma_s * eps
        if gamma > 0:
            x = x + (float(sigmas[i + 1]) ** 2 - sigma_s**2) ** 0.5 * noise_sampler(sigmas[i], sigmas[i + 1])
    return x
