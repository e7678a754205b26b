"""The lab teacher: a class-conditional latent diffusion model built from SD1.5's diffusers classes.

Stages, each one command with progress, checkpoints and resume:
``vae`` (AutoencoderKL on 32x32 Fashion-MNIST -> 4x8x8 latents), ``unet`` (UNet2DConditionModel
plus a tiny CLIP text encoder, epsilon prediction, SD's noise schedule, prompt dropout for CFG),
``export`` (a diffusers folder that StableDiffusionPipeline.from_pretrained loads).
"""

from __future__ import annotations

import argparse
import json
import math
import string
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.io import atomic_save_file, read_safetensors
from ..training.checkpoint import load_training_state, save_training_state
from . import TEACHER_DIR
from .data import CLASS_NAMES, load_fashion_mnist

WORK_DIR = Path(__file__).resolve().parent / "work"
MAX_TOKENS = 16
VAE_STEPS, VAE_BATCH = 2000, 64      # what the committed teacher was trained with (the CLI's defaults)
UNET_STEPS, UNET_BATCH = 4500, 128


class StepTimer:
    """Mean wall-clock of the training steps after the first (which pays for allocation and warm-up)."""

    def __init__(self):
        self.last, self.total, self.count = None, 0.0, 0

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.total, self.count = self.total + now - self.last, self.count + 1
        self.last = now

    @property
    def seconds_per_step(self) -> float | None:
        return self.total / self.count if self.count else None


# --- building blocks -------------------------------------------------------------------------

def build_tokenizer(folder: str | Path):
    """A CLIP BPE tokenizer over characters, with merge rules toward the ten class names' words.

    BPE applies merges by rank across words, so most class words become one token and a few stay
    split (e.g. "sandal": "an" from "ankle" ranks first); any text tokenizes, nothing is unknown."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    words = sorted({w for name in CLASS_NAMES for w in name.replace("-", " ").split() if len(w) > 1})
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            if rule not in merges:
                merges.append(rule)
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                            model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def build_unet(cross_attention_dim: int = 64):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=32,  # ComfyUI fixes 32 groups
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8)


def sd_noise_scheduler_config() -> dict:
    """SD1.5's scheduler as shipped (PNDM, scaled_linear 0.00085-0.012, 1000 steps, epsilon)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", prediction_type="epsilon", set_alpha_to_one=False,
                skip_prk_steps=True, steps_offset=1, trained_betas=None, timestep_spacing="leading")


# --- training helpers ------------------------------------------------------------------------

def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def _resume(ckpt: Path, modules, optimizers) -> int:
    if ckpt.is_file():
        step, _ = load_training_state(ckpt, modules, optimizers)
        print(f"resumed from {ckpt} at step {step}")
        return step
    return 0


# --- stage: vae ------------------------------------------------------------------------------

def train_vae(steps: int, batch_size: int, lr: float, work: Path, ckpt_every: int, seed: int = 0) -> float | None:
    """Train the VAE to ``steps`` (resuming from ``work``), save it to ``work/vae``; returns the mean seconds per
    step of this run (None if it ran fewer than two)."""
    torch.manual_seed(seed)
    images, _ = load_fashion_mnist("train")
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ckpt = work / "vae_state.safetensors"
    step = _resume(ckpt, {"vae": vae}, {"vae": opt})
    bar = tqdm(total=steps, initial=step, desc="vae")
    timer = StepTimer()
    while step < steps:
        timer.tick()
        x = images[torch.randint(0, len(images), (batch_size,))]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, 200)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.0f}")
        if step % ckpt_every == 0 or step == steps:
            save_training_state(ckpt, {"vae": vae}, {"vae": opt}, step)
    bar.close()
    # SD's convention: latents are multiplied by a scaling factor that gives them unit variance.
    with torch.no_grad():
        mean = torch.cat([vae.encode(images[i:i + 1000]).latent_dist.mean for i in range(0, 10000, 1000)])
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(work / "vae")
    print(f"vae saved to {work / 'vae'} (scaling_factor={scale:.4f})")
    return timer.seconds_per_step


# --- stage: unet -----------------------------------------------------------------------------

@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, already multiplied by the scaling factor."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode", leave=False):
        post = vae.encode(images[i:i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    s = vae.config.scaling_factor
    return torch.cat(means) * s, torch.cat(stds) * s


def train_unet(steps: int, batch_size: int, lr: float, work: Path, ckpt_every: int,
               p_uncond: float = 0.1, ema_decay: float = 0.999, seed: int = 0) -> float | None:
    """Train the UNet and text encoder to ``steps`` (resuming from ``work``, which holds the VAE); returns the
    mean seconds per step of this run (None if it ran fewer than two)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    images, labels = load_fashion_mnist("train")
    cache = work / "latents.safetensors"
    if cache.is_file():
        cached, _ = read_safetensors(cache)
        lat_mean, lat_std = cached["mean"], cached["std"]
    else:
        lat_mean, lat_std = encode_dataset(vae, images)
        atomic_save_file({"mean": lat_mean, "std": lat_std}, cache)
    tokenizer = build_tokenizer(work / "tokenizer")
    prompts = list(CLASS_NAMES) + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet(text_encoder.config.hidden_size)
    ema_unet = build_unet(text_encoder.config.hidden_size).requires_grad_(False)
    ema_text = build_text_encoder(tokenizer).requires_grad_(False)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    noise_sched = DDPMScheduler(**{k: v for k, v in sd_noise_scheduler_config().items()
                                   if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    alphas_cumprod = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    modules = {"unet": unet, "text": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    ckpt = work / "unet_state.safetensors"
    step = _resume(ckpt, modules, {"unet": opt})
    print(f"unet parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M")
    bar = tqdm(total=steps, initial=step, desc="unet")
    timer = StepTimer()
    while step < steps:
        timer.tick()
        idx = torch.randint(0, len(lat_mean), (batch_size,))
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])
        cls = labels[idx].clone()
        cls[torch.rand(batch_size) < p_uncond] = len(CLASS_NAMES)  # the empty prompt
        t = torch.randint(0, 1000, (batch_size,))
        eps = torch.randn_like(x0)
        xt = noise_sched.add_noise(x0, eps, t)
        cond = text_encoder(ids[cls])[0]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        # min-SNR-5 weighting (Hang et al. 2023) for epsilon prediction: faster, steadier convergence.
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = snr.clamp(max=5.0) / snr
        loss = (weight * (pred - eps).pow(2).mean(dim=(1, 2, 3))).mean()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, 500)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % ckpt_every == 0 or step == steps:
            save_training_state(ckpt, modules, {"unet": opt}, step)
    bar.close()
    return timer.seconds_per_step


def measure_training_cost(steps: int = 20, encode_images: int = 2560) -> dict:
    """What training the teacher costs on this machine: the two stages' seconds per step, timed on short runs of
    the very training code in a scratch folder, times the steps the committed teacher was trained for.

    The UNet run reads latents of the first ``encode_images`` training images (a step's cost does not depend on
    how many there are to draw from)."""
    from diffusers import AutoencoderKL

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vae_spp = train_vae(steps, VAE_BATCH, 1e-3, work, ckpt_every=10 ** 9)
        images, _ = load_fashion_mnist("train")
        mean, std = encode_dataset(AutoencoderKL.from_pretrained(work / "vae").eval(), images[:encode_images])
        atomic_save_file({"mean": mean, "std": std}, work / "latents.safetensors")
        unet_spp = train_unet(steps, UNET_BATCH, 1e-3, work, ckpt_every=10 ** 9)
    return {"vae_seconds_per_step": vae_spp, "vae_steps": VAE_STEPS, "vae_batch": VAE_BATCH,
            "unet_seconds_per_step": unet_spp, "unet_steps": UNET_STEPS, "unet_batch": UNET_BATCH,
            "seconds": vae_spp * VAE_STEPS + unet_spp * UNET_STEPS, "threads": torch.get_num_threads()}


# --- stage: export ---------------------------------------------------------------------------

def export_teacher(work: Path, out: Path):
    """Assemble the EMA weights into a diffusers StableDiffusionPipeline folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet(text_encoder.config.hidden_size)
    load_training_state(work / "unet_state.safetensors",
                        {"ema_unet": unet, "ema_text": text_encoder}, {})
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"), text_encoder=text_encoder,
        tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**sd_noise_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"teacher written to {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m direct_distill.lab.teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "unet", "export"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=UNET_BATCH)
    parser.add_argument("--vae-batch-size", type=int, default=VAE_BATCH)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="checkpoints and intermediate files")
    parser.add_argument("--out", type=Path, default=TEACHER_DIR)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "vae":
        train_vae(args.steps or VAE_STEPS, args.vae_batch_size, args.lr or 1e-3, args.work, args.checkpoint_every)
    elif args.stage == "unet":
        train_unet(args.steps or UNET_STEPS, args.batch_size, args.lr or 1e-3, args.work, args.checkpoint_every)
    else:
        export_teacher(args.work, args.out)


if __name__ == "__main__":
    main()
