"""Memory and time of the real-model commands at 512 px on a GPU, estimated from what is measured here on SD1.5-
and SDXL-size models built with random weights on the meta device (nothing is allocated or downloaded).

Measured: FLOPs with torch's FLOP counter (every matrix product and convolution, attention included) over one
forward pass, or over one LoRA training pass (forward, then backward through the frozen UNet to the LoRA
weights; the NAFNet's full training pass is three forwards' worth); the activations a training pass keeps for its
backward (autograd's saved tensors, each storage once, weights excluded, attention keeping what a GPU's
memory-efficient kernel keeps: q, k, v, output and log-sum-exp, not the score matrix); parameter counts.
Estimated: time = FLOPs / the sustained rate given (--tflops), memory = weights + batch x activations (bfloat16)
+ the LoRA's optimizer state.
Run: python benchmarks/real_model_cost.py [--tflops 100]
"""

import argparse
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_architectures import CLIP_L, OPEN_CLIP_BIGG, SD15_UNET, SD_VAE, SDXL_UNET  # noqa: E402

from direct_distill.models.nafnet import PRESETS, TimeEmbedNAFNet  # noqa: E402
from direct_distill.training.lora import LoraSpec  # noqa: E402
from direct_distill.training.teachers import set_dtype  # noqa: E402

DTYPE = torch.bfloat16
LATENT = 64          # 512 px
TOKENS = 77


class _EfficientAttention(torch.autograd.Function):
    """Attention as a GPU's flash / memory-efficient kernel runs it: no score matrix in memory, and only q, k, v,
    the output and the log-sum-exp kept for the backward. Measures memory only: the output is left uncomputed."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def efficient_attention():
    """diffusers' attention (F.scaled_dot_product_attention) replaced by :class:`_EfficientAttention`."""
    sdpa = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        assert attn_mask is None and not is_causal and not dropout_p
        return _EfficientAttention.apply(q, k, v)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def saved_bytes(fn, weights) -> int:
    """Bytes autograd keeps between ``fn()``'s forward and its backward (each storage once, weights excluded)."""
    skip = {w.untyped_storage()._cdata for w in weights}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            kept[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


class _LiveBytes(TorchDispatchMode):
    """The most bytes held at once by the tensors the ops under it make (each storage once, until freed)."""

    def __init__(self):
        super().__init__()
        self.size, self.holders, self.now, self.peak = {}, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.size:
                    self.size[key], self.holders[key] = t.untyped_storage().nbytes(), 0
                    self.now += self.size[key]
                    self.peak = max(self.peak, self.now)
                self.holders[key] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key):
        self.holders[key] -= 1
        if not self.holders[key]:
            self.now -= self.size.pop(key)
            del self.holders[key]


def peak_bytes(fn) -> int:
    """Peak memory of the tensors ``fn()`` makes (a no-grad forward: its working memory beyond the weights)."""
    with _LiveBytes() as live:
        fn()
    return live.peak


def unet_costs(config: dict) -> dict:
    """Per sample at 512 px: forward FLOPs, LoRA training-pass FLOPs, kept activations; the UNet's and the
    LoRA's parameter counts."""
    from diffusers import UNet2DConditionModel

    from direct_distill.training.lora import add_lora

    with torch.device("meta"):
        unet = set_dtype(UNet2DConditionModel(**config), DTYPE).requires_grad_(False)
        x = torch.randn(1, 4, LATENT, LATENT, dtype=DTYPE)
        t = torch.tensor([500])
        cond = torch.randn(1, TOKENS, config["cross_attention_dim"], dtype=DTYPE)
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, dtype=DTYPE),
                                           "time_ids": torch.ones(1, 6, dtype=DTYPE)}}
        params = sum(p.numel() for p in unet.parameters())
        with torch.no_grad():
            forward = flops(lambda: unet(x, t, cond, **extra))
            with efficient_attention():
                working = peak_bytes(lambda: unet(x, t, cond, **extra))
        lora = add_lora(unet, LoraSpec(), "student")
        lora_params = sum(p.numel() for p in lora.parameters())

        def train_pass():
            unet(x, t, cond, **extra).sample.float().square().mean().backward()

        train = flops(train_pass)
        with efficient_attention():
            kept = saved_bytes(lambda: unet(x, t, cond, **extra), list(unet.parameters()))
    return dict(params=params, lora_params=lora_params, forward=forward, working=working, train=train, kept=kept)


def vae_encoder_costs() -> dict:
    """Per 512 px image: the SD VAE encoder's FLOPs and working memory; its parameter count."""
    from diffusers import AutoencoderKL

    with torch.device("meta"), torch.no_grad():
        vae = set_dtype(AutoencoderKL(**SD_VAE), DTYPE)
        image = torch.randn(1, 3, 8 * LATENT, 8 * LATENT, dtype=DTYPE)
        forward = flops(lambda: vae.encode(image))
        with efficient_attention():
            working = peak_bytes(lambda: vae.encode(image))
    params = sum(p.numel() for m in (vae.encoder, vae.quant_conv) for p in m.parameters())
    return dict(params=params, all_params=sum(p.numel() for p in vae.parameters()), forward=forward, working=working)


def text_encoder_params(*configs: dict) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return sum(sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**c)).parameters()) for c in configs)


def nafnet_costs(preset: str) -> dict:
    """Per 512 px latent: a NAFNet stage's training-pass FLOPs and kept activations; its parameter count."""
    with torch.device("meta"):
        net = set_dtype(TimeEmbedNAFNet(**{**PRESETS[preset], "in_channels": 4, "out_channels": 4}), DTYPE)
        x = torch.randn(1, 4, LATENT, LATENT, dtype=DTYPE)
        with torch.no_grad():
            forward = flops(lambda: net(x, torch.tensor([500.0])))
        # forward, then the gradients of inputs and of weights, each a forward's worth of products (torch's
        # counter overcounts the backward of NAFNet's depthwise convolutions: it ignores their groups)
        return dict(params=sum(p.numel() for p in net.parameters()), train=3 * forward,
                    kept=saved_bytes(lambda: net(x, torch.tensor([500.0])), list(net.parameters())))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tflops", type=float, default=100.0, help="sustained bf16 rate of the GPU, TFLOP/s")
    args = parser.parse_args(argv)
    GB, ADAM = 1e9, 16   # fp32 weight, gradient and two moments per trained parameter

    sd15, sdxl = unet_costs(SD15_UNET), unet_costs(SDXL_UNET)
    vae = vae_encoder_costs()
    clip = {"SD1.5": text_encoder_params(CLIP_L), "SDXL": text_encoder_params(CLIP_L, OPEN_CLIP_BIGG)}
    stages = [nafnet_costs("paper_stage1"), nafnet_costs("paper_stage2")]
    print(f"Measured per sample at 512 px in bfloat16 (time at {args.tflops:g} TFLOP/s sustained):")
    for name, c in (("SD1.5", sd15), ("SDXL", sdxl)):
        print(f"- {name} UNet: {c['params'] / 1e6:.0f} M parameters; forward {c['forward'] / 1e12:.2f} TFLOP, "
              f"{c['working'] / GB:.2f} GB working memory; LoRA training pass {c['train'] / 1e12:.2f} TFLOP, keeping "
              f"{c['kept'] / GB:.2f} GB of activations (LoRA rank 16: {c['lora_params'] / 1e6:.1f} M parameters)")
    print(f"- SD VAE encoder: {vae['forward'] / 1e12:.2f} TFLOP, {vae['working'] / GB:.2f} GB working memory")
    for name, c in zip(("1", "2"), stages):
        print(f"- shortcut stage {name} (paper size): {c['params'] / 1e6:.1f} M parameters, training pass "
              f"{c['train'] / 1e9:.0f} GFLOP, keeping {c['kept'] / GB:.2f} GB")

    def row(command, total_flops, memory_bytes):
        hours = total_flops / (args.tflops * 1e12) / 3600
        time = f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"
        print(f"| {command} | {total_flops / 1e15:,.0f} | {time} | {memory_bytes / GB:.1f} GB |")

    def weights(unet, model):
        return 2 * (unet["params"] + clip[model])

    print("\n| command (512 px, bfloat16) | PFLOP | time | GPU memory |\n|---|---|---|---|")
    images, batch = 10_000, 8
    row(f"latents: {images:,} images, VAE batch {batch}", images * vae["forward"],
        2 * vae["params"] + batch * vae["working"])
    trajectories, steps, batch = 2000, 20, 16
    for model, c in (("SD1.5", sd15), ("SDXL", sdxl)):   # classifier-free guidance: two UNet passes a step
        row(f"shortcut capture, {model}: {trajectories} runs x {steps} steps, batch {batch}",
            trajectories * steps * 2 * c["forward"], weights(c, model) + 2 * vae["all_params"]
            + 2 * batch * c["working"])
    batch, counts = 64, (3000, 1500)
    row(f"shortcut training: stage 1 + 2 ({counts[0]} + {counts[1]} steps), batch {batch}",
        batch * sum(n * c["train"] for n, c in zip(counts, stages)),
        max(ADAM * c["params"] + batch * c["kept"] for c in stages))
    # The teacher's steps distil classifier-free guidance: each is one UNet pass over the doubled batch.
    rounds, per_round, batch = 3, 2000, 8   # 32 -> 16 -> 8 -> 4 steps; two teacher DDIM steps per student step
    for model, c in (("SD1.5", sd15), ("SDXL", sdxl)):
        row(f"progressive, {model}: 32 -> 4 steps, {rounds} rounds x {per_round} steps, batch {batch}",
            rounds * per_round * batch * (2 * 2 * c["forward"] + c["train"]),
            weights(c, model) + ADAM * c["lora_params"] + batch * (c["kept"] + 2 * c["working"]))
    nfes, substeps, total, batch = (2, 3, 4, 5), 4, 2000, 4
    # a step draws one NFE n: n student steps, each after `substeps` teacher steps, all n graphs kept until the
    # backward
    for model, c in (("SD1.5", sd15), ("SDXL", sdxl)):
        per_step = sum(n * (substeps * 2 * c["forward"] + c["train"]) for n in nfes) / len(nfes)
        row(f"sfd, {model}: NFE {'/'.join(map(str, nfes))}, {total} steps, batch {batch}", total * batch * per_step,
            weights(c, model) + ADAM * c["lora_params"] + batch * (max(nfes) * c["kept"] + 2 * c["working"]))

if __name__ == "__main__":
    main()
