"""Prints the cost of the paper-size two-stage shortcut against one SD1.5-size UNet call (CPU).

The paper: about 6 % of a UNet step. MACs count Conv2d and Linear layers (attention's two batched
matrix products are not counted, which flatters neither side much: the shortcut has none).
Run: python benchmarks/shortcut_cost.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_unet import median_seconds, sd15_inputs, sd15_unet  # noqa: E402

from direct_distill.models.nafnet import PRESETS, TwoStageShortcut, count_macs  # noqa: E402


def main():
    torch.set_grad_enabled(False)
    x, t, cond = sd15_inputs()
    unet = sd15_unet()
    shortcut = TwoStageShortcut.from_configs(PRESETS["paper_stage1"], PRESETS["paper_stage2"]).eval()
    unet_macs = count_macs(unet, (x, t, cond))
    short_macs = count_macs(shortcut, (x, t))
    unet_params = sum(p.numel() for p in unet.parameters())
    short_params = sum(p.numel() for p in shortcut.parameters())
    unet_s = median_seconds(lambda: unet(x, t, encoder_hidden_states=cond), repeats=3)
    short_s = median_seconds(lambda: shortcut(x, t), repeats=5)
    print(f"threads: {torch.get_num_threads()}, latent 1x4x64x64")
    print(f"SD1.5-size UNet : {unet_params / 1e6:7.1f} M params, {unet_macs / 1e9:7.1f} GMACs, {unet_s * 1e3:9.1f} ms")
    print(f"shortcut (2 stg): {short_params / 1e6:7.1f} M params, {short_macs / 1e9:7.2f} GMACs, "
          f"{short_s * 1e3:9.1f} ms")
    print(f"shortcut / UNet : MACs {100 * short_macs / unet_macs:.1f} %, time {100 * short_s / unet_s:.1f} %"
          " (paper: about 6 %)")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
