"""Prints the cost of one ExpKarrasScheduler.step() relative to one SD1.5-size UNet call (CPU).

Target: under 0.5 %. Run: python benchmarks/scheduler_overhead.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_unet import median_seconds, sd15_inputs, sd15_unet  # noqa: E402

from direct_distill.schedulers import ExpKarrasScheduler  # noqa: E402


def main():
    torch.set_grad_enabled(False)
    unet = sd15_unet()
    x, t, cond = sd15_inputs()
    unet_s = median_seconds(lambda: unet(x, t, encoder_hidden_states=cond), repeats=3)

    sched = ExpKarrasScheduler()
    eps = torch.randn_like(x)

    def full_run():
        sched.set_timesteps(20)
        sample = x.clone()
        for step_t in sched.timesteps:
            sample = sched.step(eps, step_t, sample).prev_sample

    run_s = median_seconds(full_run, repeats=20)
    step_s = run_s / 20
    print(f"SD1.5-size UNet call (4x64x64, batch 1, {torch.get_num_threads()} threads): {unet_s * 1e3:.1f} ms")
    print(f"ExpKarrasScheduler: set_timesteps(20) + 20 steps: {run_s * 1e3:.2f} ms -> {step_s * 1e3:.3f} ms/step")
    print(f"step() cost relative to one UNet call: {100 * step_s / unet_s:.3f} % (target < 0.5 %)")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
