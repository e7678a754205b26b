"""TimeEmbedNAFNet, the final-step shortcut of seed 000 (§3.4): (x_t, t) -> clean latent x0.

NAFNet (Chen et al., "Simple Baselines for Image Restoration", 2022) with a time embedding fed
to every block, and the paper's two-stage composition: a denoiser, then a deblurrer.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn


class SimpleGate(nn.Module):
    """NAFNet's activation: split the channels in half and multiply the halves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class TimeNAFBlock(nn.Module):
    """A NAFBlock whose first norm is scaled and shifted per channel by the time embedding."""

    def __init__(self, c: int, time_dim: int):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm2d(c), LayerNorm2d(c)
        self.time = nn.Linear(time_dim, 2 * c)  # -> (scale, shift)
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.dwconv = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))  # simplified channel attention
        self.conv2 = nn.Conv2d(c, c, 1)
        self.ffn1, self.ffn2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(c, c, 1)
        self.gate = SimpleGate()
        # Zero-initialised branch scales: every block starts as the identity (as in NAFNet).
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm1(x) * (1 + scale) + shift
        h = self.gate(self.dwconv(self.conv1(h)))
        h = self.conv2(h * self.sca(h))
        y = x + self.beta * h
        h = self.ffn2(self.gate(self.ffn1(self.norm2(y))))
        return y + self.gamma * h


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of (fractional) timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimeEmbedNAFNet(nn.Module):
    """NAFNet U-shape conditioned on the teacher's training timestep; predicts the clean latent.

    Args:
        width: channels at full resolution; each level down doubles them.
        enc_blocks: blocks per encoder level, as applied (shallowest first).
        middle_blocks: blocks at the bottom of the U.
        dec_blocks: blocks per decoder level, as applied (deepest first), one per encoder level.
        in_channels, out_channels: latent channels (4 for SD1.x/2.x/XL).
        time_dim: width of the time embedding; defaults to ``4 * width``.

    ``forward(x_t, t)`` takes a VP-scaled latent (B, C, H, W) and timesteps in 0..999
    (fractional allowed; shape (B,), scalar, or a number). Global residual (when in_channels ==
    out_channels): ``x0 = x_t + net(x_t, t)``.
    In the hand-off band the signal coefficient a_t is close to 1 (about 0.95 at t = 100 in SD),
    so the input is already a rough x0 and the net learns the correction; the time embedding
    lets it learn the 1/a_t rescaling too, which keeps the model free of any noise table.
    """

    def __init__(self, width: int = 32, enc_blocks=(1, 1, 1), middle_blocks: int = 1, dec_blocks=(1, 1, 1),
                 in_channels: int = 4, out_channels: int = 4, time_dim: int | None = None):
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(f"enc_blocks {list(enc_blocks)} and dec_blocks {list(dec_blocks)} need one entry per "
                             "level")
        time_dim = time_dim or 4 * width
        self.config = dict(width=width, enc_blocks=list(enc_blocks), middle_blocks=middle_blocks,
                           dec_blocks=list(dec_blocks), in_channels=in_channels, out_channels=out_channels,
                           time_dim=time_dim)
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.intro = nn.Conv2d(in_channels, width, 3, padding=1)
        self.ending = nn.Conv2d(width, out_channels, 3, padding=1)
        self.encoders, self.downs, self.ups, self.decoders = (nn.ModuleList() for _ in range(4))
        c = width
        for n in enc_blocks:
            self.encoders.append(nn.ModuleList(TimeNAFBlock(c, time_dim) for _ in range(n)))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle = nn.ModuleList(TimeNAFBlock(c, time_dim) for _ in range(middle_blocks))
        for n in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(nn.ModuleList(TimeNAFBlock(c, time_dim) for _ in range(n)))
        self.pad_to = 2 ** len(enc_blocks)
        self.residual = in_channels == out_channels

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        B, _, H, W = x_t.shape
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(B)
        temb = self.time_mlp(timestep_embedding(t, self.width).to(x_t.dtype))
        x = self.intro(F.pad(x_t, (0, -W % self.pad_to, 0, -H % self.pad_to)))
        skips = []
        for blocks, down in zip(self.encoders, self.downs):
            x = run_blocks(blocks, x, temb)
            skips.append(x)
            x = down(x)
        x = run_blocks(self.middle, x, temb)
        for blocks, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = run_blocks(blocks, up(x) + skip, temb)
        out = self.ending(x)[:, :, :H, :W]
        return out + x_t if self.residual else out


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x, temb)
    return x


class TwoStageShortcut(nn.Module):
    """Seed 000's shortcut: stage 1 denoises (x_t, t) -> x0, optional stage 2 deblurs that x0.

    ``t_band`` (training timesteps the shortcut was trained for), ``teacher``,
    ``teacher_unet_shape_fingerprint``, ``latent_channels`` and ``metadata`` are filled in by
    ``load_shortcut``; a freshly built shortcut has no band and no teacher to check.
    """

    def __init__(self, stage1: TimeEmbedNAFNet, stage2: TimeEmbedNAFNet | None = None):
        super().__init__()
        if stage2 is not None and stage2.config["in_channels"] != stage1.config["out_channels"]:
            raise ValueError(f"stage 2 takes {stage2.config['in_channels']} channels "
                             f"but stage 1 gives {stage1.config['out_channels']}")
        last = (stage2 or stage1).config["out_channels"]
        if last != stage1.config["in_channels"]:  # a latent in, a latent out: the pipeline decodes what it gives
            raise ValueError(f"the shortcut takes {stage1.config['in_channels']}-channel latents but gives {last} "
                             "channels")
        self.stage1, self.stage2 = stage1, stage2
        self.latent_channels = stage1.config["in_channels"]
        self.t_band: tuple[float, float] | None = None
        self.teacher: str | None = None
        self.teacher_unet_shape_fingerprint: str | None = None
        self.metadata: dict = {}

    @classmethod
    def from_configs(cls, stage1: dict, stage2: dict | None = None) -> "TwoStageShortcut":
        return cls(TimeEmbedNAFNet(**stage1), TimeEmbedNAFNet(**stage2) if stage2 is not None else None)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        x0 = self.stage1(x_t, t)
        return self.stage2(x0, t) if self.stage2 is not None else x0

    def check_handoff(self, t: float, force: bool = False) -> None:
        """Raise ValueError if timestep ``t`` lies outside the trained band (unless ``force``)."""
        if force or self.t_band is None:
            return
        lo, hi = self.t_band
        if not lo <= float(t) <= hi:
            raise ValueError(
                f"hand-off at timestep t={float(t):.2f} is outside the band this shortcut was trained for "
                f"[{lo:g}, {hi:g}] (teacher: {self.teacher}); its output there is unreliable. "
                "Hand off at a step whose timestep lies in the band, or force the hand-off.")


# Both paper presets: width 64, depth 3, 36 blocks, so ~3.9 GMACs each on a 4x64x64 latent
# (every block costs about the same MACs at any level; deep blocks just hold more parameters).
PRESETS: dict[str, dict] = {
    "paper_stage1": dict(width=64, enc_blocks=[2, 2, 2], middle_blocks=25, dec_blocks=[2, 2, 1]),  # 57.7 M
    "paper_stage2": dict(width=64, enc_blocks=[1, 1, 1], middle_blocks=3, dec_blocks=[3, 11, 16]),  # 13.5 M
    "lab_stage1": dict(width=32, enc_blocks=[1, 1], middle_blocks=2, dec_blocks=[1, 1]),
    "lab_stage2": dict(width=32, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[2, 4]),
    "lab_wide_stage1": dict(width=64, enc_blocks=[1, 1], middle_blocks=2, dec_blocks=[1, 1]),
    "lab_wide_stage2": dict(width=64, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[2, 4]),
}
SIZES = tuple(dict.fromkeys(name.rsplit("_stage", 1)[0] for name in PRESETS))  # both stages of a size: "lab", ...


def count_macs(module: nn.Module, example_inputs: tuple) -> int:
    """Multiply-accumulates of every Conv2d and Linear in one forward pass on ``example_inputs``.

    Works on the meta device, so large models can be measured without allocating them.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, _, out):
        nonlocal total
        total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
             for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Parameters and MACs of TimeEmbedNAFNet presets.")
    parser.add_argument("--preset", nargs="+", default=["paper"],
                        help=f"one or more of {', '.join(PRESETS)}; a size ({', '.join(SIZES)}) for both stages")
    parser.add_argument("--latent", default="4x64x64", help="CxHxW of the latent (batch 1)")
    args = parser.parse_args(argv)
    names = [n for p in args.preset for n in ([f"{p}_stage1", f"{p}_stage2"] if p in SIZES else [p])]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown preset {unknown[0]!r}; choose from {', '.join([*PRESETS, *SIZES])}")
    c, h, w = (int(v) for v in args.latent.lower().split("x"))
    total_params = total_macs = 0
    for name in names:
        with torch.device("meta"):
            model = TimeEmbedNAFNet(**{**PRESETS[name], "in_channels": c, "out_channels": c})
            macs = count_macs(model, (torch.zeros(1, c, h, w), torch.zeros(1)))
        params = sum(p.numel() for p in model.parameters())
        total_params, total_macs = total_params + params, total_macs + macs
        print(f"{name:14s} {params / 1e6:8.2f} M params {macs / 1e9:8.3f} GMACs on 1x{c}x{h}x{w}")
    if len(names) > 1:
        print(f"{'total':14s} {total_params / 1e6:8.2f} M params {total_macs / 1e9:8.3f} GMACs")


if __name__ == "__main__":
    main()
