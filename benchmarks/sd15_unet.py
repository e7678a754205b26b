"""An SD1.5-size UNet2DConditionModel with random weights (nothing downloaded), and a timer, for cost figures."""

import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from sd_architectures import SD15_UNET


def sd15_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET).eval()


def sd15_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 64, 64, generator=g), torch.tensor([500.0] * batch),
            torch.randn(batch, 77, 768, generator=g))


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
