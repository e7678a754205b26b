"""The lab teacher: a class-conditional latent diffusion model built from SD1.5's diffusers classes, trained
here through the project's shared training loop (progress, checkpoints, exact resume).

Stages, each one command: ``features`` (a label-free feature network for the VAE's optional perceptual term,
``lab/features.py``), ``vae`` (AutoencoderKL, 1x32x32 Fashion-MNIST -> 4x8x8 latents, reconstruction + KL +
a patch discriminator, as SD's own autoencoder is trained), ``unet`` (UNet2DConditionModel plus a tiny CLIP text
encoder on those latents: epsilon prediction, SD's noise schedule, prompt dropout for CFG, min-SNR weighting, EMA),
``decoder`` (the VAE's decoder fine-tuned with the patch discriminator, its encoder frozen, so the latents the UNet
learned keep their meaning), ``export`` (a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.io import FileFormatError, atomic_save_file, files_sha256, ordinary_permissions, read_safetensors
from ..training.checkpoint import load_training_state
from ..training.data import encode_images, vae_checksum
from ..training.loop import CHECKPOINT_NAME, CheckpointMismatch, Player, TrainConfig, settings_of, train
from . import TEACHER_DIR
from .data import CLASS_NAMES, load_fashion_mnist
from .features import (FEATURES_FILE, ContrastiveTraining, FeatureConfig, FeatureNet, load_feature_net,
                       perceptual_distance, train_features)

WORK_DIR = Path(__file__).resolve().parent / "work" / "teacher"
MAX_TOKENS = 16


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
    """1 -> 4 channels, 32x32 -> 8x8 (two downsamplings), 32 GroupNorm groups."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(32, 64, 128), norm_num_groups=32,
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


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / (a.float() - b.float()).pow(2).mean()))


def vae_digest(vae_dir: Path) -> str:
    """A saved VAE's weights and config (its scaling factor scales the latents a UNet learns)."""
    return files_sha256(*sorted(p for p in Path(vae_dir).iterdir() if p.suffix in (".json", ".safetensors")))


# --- stage: vae ------------------------------------------------------------------------------

@dataclass
class VAEConfig:
    """The autoencoder's training: per-pixel L1 + L2 reconstruction and a KL term on the per-image sum.

    With ``disc_start`` set, a hinge patch-GAN term joins from that step on, weighted adaptively against the
    reconstruction (Esser et al. 2021, the loss SD's autoencoder was trained with, without the perceptual term: no
    pretrained network here). The committed VAE does without it: on this data, from step 4,000 of a run at weight
    0.5 (Adam betas 0.5, 0.9), it raised the round-trip FD from 0.33 to 0.63 in 1,000 steps.

    With ``perceptual_weight`` > 0 the reconstruction also counts ``perceptual_distance`` in the lab's own
    label-free feature network (stage ``features``; see ``lab/features.py``), in SD's loss LPIPS's place."""

    steps: int = 10000
    batch_size: int = 32
    lr: float = 1e-3
    disc_lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 200
    final_lr_fraction: float = 0.05
    kl_weight: float = 1e-6
    disc_start: int | None = None
    disc_weight: float = 0.5
    disc_channels: int = 64
    disc_betas: tuple[float, float] = (0.5, 0.9)
    perceptual_weight: float = 0.0
    eval_every: int = 500
    checkpoint_every: int = 500
    seed: int = 0


class PatchDiscriminator(torch.nn.Module):
    """A PatchGAN (Isola et al. 2017) for 1x32x32 images: a logit per overlapping patch."""

    def __init__(self, channels: int = 64):
        super().__init__()
        c = channels
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 4, 2, 1), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(c, 2 * c, 4, 2, 1), torch.nn.GroupNorm(32, 2 * c), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(2 * c, 4 * c, 3, 1, 1), torch.nn.GroupNorm(32, 4 * c), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(4 * c, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VAETraining:
    """The loop's method: the VAE (reconstruction + KL), and with ``config.disc_start`` set two players, ``vae``
    (+ adversarial) and ``discriminator`` (hinge)."""

    def __init__(self, vae, images: torch.Tensor, config: VAEConfig, held_out: torch.Tensor | None = None,
                 features=None):
        if config.perceptual_weight > 0 and features is None:
            raise ValueError("a perceptual_weight needs the feature network (lab.features.load_feature_net)")
        self.vae, self.images, self.config, self.held_out = vae, images, config, held_out
        self.features = features if config.perceptual_weight > 0 else None
        self.modules = {"vae": vae}
        self.discriminator = None
        if config.disc_start is not None:
            self.discriminator = PatchDiscriminator(config.disc_channels)
            self.modules["discriminator"] = self.discriminator
            self.players = {"vae": Player(("vae",)),
                            "discriminator": Player(("discriminator",), lr=config.disc_lr, betas=config.disc_betas)}

    def batch(self, step: int) -> torch.Tensor:
        return self.images[torch.randint(len(self.images), (self.config.batch_size,))]

    def _adaptive_weight(self, reconstruction: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
        """|grad rec| / |grad adv| at the decoder's last layer: the adversarial term never outweighs the
        reconstruction it refines."""
        last = self.vae.decoder.conv_out.weight
        g_rec = torch.autograd.grad(reconstruction, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adversarial, last, retain_graph=True)[0]
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()

    def loss(self, step: int, x: torch.Tensor):
        cfg = self.config
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        reconstruction = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        if self.features is not None:
            reconstruction = reconstruction + cfg.perceptual_weight * perceptual_distance(self.features, rec, x)
        loss = reconstruction + cfg.kl_weight * posterior.kl().mean()
        if self.discriminator is None:
            return loss
        return self._players(step, x, rec, reconstruction, loss)

    def _players(self, step: int, x: torch.Tensor, rec: torch.Tensor, reconstruction: torch.Tensor,
                 loss: torch.Tensor):
        adversarial_on = step >= self.config.disc_start
        if adversarial_on:
            adversarial = -self.discriminator(rec).mean()
            loss = loss + self.config.disc_weight * self._adaptive_weight(reconstruction, adversarial) * adversarial
        yield "vae", loss
        if adversarial_on:
            real, fake = self.discriminator(x), self.discriminator(rec.detach())
            yield "discriminator", 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float] | None:
        if self.held_out is None or not self.config.eval_every or (step + 1) % self.config.eval_every:
            return None
        self.vae.eval()
        rec = torch.cat([self.vae.decode(self.vae.encode(x).latent_dist.mean).sample
                         for x in self.held_out.split(250)]).clamp(-1, 1)
        self.vae.train()
        return {"held_out_psnr": psnr(rec, self.held_out)}


def _feature_net(config: VAEConfig, work: Path) -> tuple[FeatureNet | None, dict]:
    """The frozen feature network a VAE config with a perceptual term needs, from stage ``features``, and the
    digest that ties a checkpoint to it (nothing without the term)."""
    if config.perceptual_weight <= 0:
        return None, {}
    path = work / "features" / FEATURES_FILE
    if not path.is_file():
        raise SystemExit(f"--perceptual-weight needs the feature network {path}: "
                         "run `python -m direct_distill teacher features` first")
    return load_feature_net(path), {"feature_network": files_sha256(path)}


def train_vae(config: VAEConfig, work: Path = WORK_DIR) -> float:
    """Train the VAE (resuming from ``work/vae``), set its scaling factor and save it to ``work/vae/model``;
    returns the training loop's wall-clock seconds (summed over resumed runs)."""
    torch.manual_seed(config.seed)
    vae = build_vae()
    images, _ = load_fashion_mnist("train")
    held_out = load_fashion_mnist("test")[0][:1000]
    features, inputs = _feature_net(config, work)
    result = train(VAETraining(vae, images, config, held_out, features), TrainConfig(
        steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps,
        final_lr_fraction=config.final_lr_fraction, betas=config.betas, seed=config.seed, run_dir=work / "vae",
        checkpoint_every=config.checkpoint_every, desc="vae", settings=settings_of(config, **inputs)))
    vae.eval()
    # SD's convention: latents are multiplied by the factor that gives them unit variance (measured unscaled).
    vae.register_to_config(scaling_factor=1.0)
    mean, _ = encode_images(vae, images[:10000])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    vae.save_pretrained(work / "vae" / "model")
    ordinary_permissions(work / "vae" / "model")
    print(f"vae saved to {work / 'vae' / 'model'} (scaling_factor={vae.config.scaling_factor:.4f})")
    return result.seconds


# --- stage: decoder -------------------------------------------------------------------------

def decoder_config(**overrides) -> VAEConfig:
    """The decoder's fine-tuning: reconstruction and, from the first step, the hinge patch-GAN term at weight 0.1
    (adaptive, as in ``VAEConfig``), at a fifth of the VAE's learning rate, annealed. With the encoder frozen the KL
    term has nothing to act on. SD's released ft-EMA/ft-MSE autoencoders were made the same way: the decoder alone,
    so every model trained on the original latents keeps working.

    Measured on the lab teacher (1,000 floor images per seed set, sets 0-2): round-trip FD 0.185 against 0.205
    before (the images' own 0.095), held-out PSNR 30.33 dB against 30.35, class accuracy 0.918 unchanged; the
    teacher's 20-step samples score 0.351 against 0.357. The same term without gradient clipping at a constant
    learning rate reached 0.142 (1.5x the images) in 1,000 steps but raised the samples' FD to 0.393: sharper on
    encoded latents, worse on sampled ones. At weight 0.3 the round trip worsened (FD 0.35 after 500 steps). The
    lost accuracy is not the decoder's: 750 more steps from the committed VAE (a new discriminator, lr 1e-4), with
    or without an L1 term on the images' gradients, left it between 0.913 and 0.921 on sets 0 and 1 (from 0.917,
    0.916), with no trend; 1,500 steps of the whole VAE (encoder too, lr 1e-4, batch 64, KL 1e-6) between 0.915 and
    0.921."""
    return dataclasses.replace(VAEConfig(steps=1500, lr=2e-4, warmup_steps=100, kl_weight=0.0, disc_start=0,
                                         disc_weight=0.1), **overrides)


def freeze_encoder(vae):
    """The decoder stage's VAE: encoder and quant_conv frozen, the decoder side trainable."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    return vae


def train_decoder(config: VAEConfig | None = None, work: Path = WORK_DIR) -> float:
    """Fine-tune the decoder of ``work/vae/model`` (resuming from ``work/decoder``) and save the whole VAE, encoder
    and scaling factor untouched, to ``work/decoder/model``; returns the loop's seconds (summed over resumed
    runs)."""
    from diffusers import AutoencoderKL

    config = config or decoder_config()
    vae_dir = work / "vae" / "model"
    if not (vae_dir / "config.json").is_file():
        raise SystemExit(f"no trained VAE in {vae_dir}: run `python -m direct_distill teacher vae` first")
    torch.manual_seed(config.seed)
    vae = freeze_encoder(AutoencoderKL.from_pretrained(vae_dir))
    images, _ = load_fashion_mnist("train")
    held_out = load_fashion_mnist("test")[0][:1000]
    features, inputs = _feature_net(config, work)
    result = train(VAETraining(vae, images, config, held_out, features), TrainConfig(
        steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps,
        final_lr_fraction=config.final_lr_fraction, betas=config.betas, seed=config.seed,
        run_dir=work / "decoder", checkpoint_every=config.checkpoint_every, desc="decoder",
        settings=settings_of(config, vae=vae_digest(vae_dir), **inputs)))
    vae.eval().save_pretrained(work / "decoder" / "model")
    ordinary_permissions(work / "decoder" / "model")
    print(f"vae with the fine-tuned decoder saved to {work / 'decoder' / 'model'}")
    return result.seconds


# --- stage: unet -----------------------------------------------------------------------------

@dataclass
class UNetConfig:
    """The diffusion model's training: epsilon prediction, min-SNR-gamma weighting (Hang et al. 2023), prompt
    dropout for classifier-free guidance, an EMA of the weights (the exported model)."""

    steps: int = 4500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 500
    final_lr_fraction: float = 0.02
    weight_decay: float = 1e-4
    p_uncond: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    seed: int = 0


class UNetTraining:
    """The loop's method: the UNet and the text encoder learn to predict the noise of VAE latents; their EMA
    copies (checkpointed, never trained) follow after every step through diffusers' ``EMAModel``."""

    def __init__(self, unet, text_encoder, input_ids: torch.Tensor, latent_mean: torch.Tensor,
                 latent_std: torch.Tensor, labels: torch.Tensor, config: UNetConfig):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.unet, self.text_encoder, self.config = unet, text_encoder, config
        self.input_ids, self.latent_mean, self.latent_std, self.labels = input_ids, latent_mean, latent_std, labels
        self.noise = DDPMScheduler(**{k: v for k, v in sd_noise_scheduler_config().items()
                                      if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
        self.ema_unet = copy.deepcopy(unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
        self.modules = {"unet": unet, "text": text_encoder, "ema_unet": self.ema_unet, "ema_text": self.ema_text}
        self.live = [*unet.parameters(), *text_encoder.parameters()]
        self.ema = EMAModel(self.live, decay=config.ema_decay)
        # The EMA's shadow weights are the copies' own parameters: the loop checkpoints and moves them.
        self.ema.shadow_params = [*self.ema_unet.parameters(), *self.ema_text.parameters()]

    def batch(self, step: int) -> dict:
        n = self.config.batch_size
        idx = torch.randint(len(self.latent_mean), (n,))
        x0 = self.latent_mean[idx] + self.latent_std[idx] * torch.randn(n, *self.latent_mean.shape[1:])
        prompt = self.labels[idx].clone()
        prompt[torch.rand(n) < self.config.p_uncond] = len(CLASS_NAMES)  # the empty prompt
        return {"x0": x0, "ids": self.input_ids[prompt], "t": torch.randint(0, len(self.noise.alphas_cumprod), (n,)),
                "eps": torch.randn(n, *self.latent_mean.shape[1:])}

    def loss(self, step: int, batch: dict) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        t, eps = batch["t"], batch["eps"]
        noisy = self.noise.add_noise(batch["x0"], eps, t)
        pred = self.unet(noisy, t, encoder_hidden_states=self.text_encoder(batch["ids"])[0]).sample
        snr = compute_snr(self.noise, t)
        weight = snr.clamp(max=self.config.snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        return (weight * (pred - eps).pow(2).mean(dim=(1, 2, 3))).mean()

    def after_step(self, step: int) -> None:
        self.ema.optimization_step = step  # the decay ramp follows the loop's step, also across a resume
        self.ema.step(self.live)


def prompt_ids(tokenizer) -> torch.Tensor:
    """Token ids of the ten class prompts and, last, the empty prompt."""
    return tokenizer(list(CLASS_NAMES) + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def train_unet(config: UNetConfig, work: Path = WORK_DIR) -> float:
    """Train the UNet and text encoder (resuming from ``work/unet``) on latents of ``work/vae/model``; returns the
    training loop's seconds (summed over resumed runs)."""
    from diffusers import AutoencoderKL

    vae_dir = work / "vae" / "model"
    if not (vae_dir / "config.json").is_file():
        raise SystemExit(f"no trained VAE in {vae_dir}: run `python -m direct_distill teacher vae` first")
    torch.manual_seed(config.seed)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    images, labels = load_fashion_mnist("train")
    cache = work / "unet" / "latents.safetensors"
    checksum = vae_checksum(vae)
    cached, meta = read_safetensors(cache) if cache.is_file() else ({}, {})
    if meta.get("vae_checksum") != checksum:
        mean, std = encode_images(vae, images)
        cached = {"mean": mean, "std": std}
        atomic_save_file(cached, cache, {"vae_checksum": checksum})
    tokenizer = build_tokenizer(work / "tokenizer")
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet(text_encoder.config.hidden_size)
    print(f"unet parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M")
    method = UNetTraining(unet, text_encoder, prompt_ids(tokenizer), cached["mean"], cached["std"], labels, config)
    result = train(method, TrainConfig(
        steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps,
        final_lr_fraction=config.final_lr_fraction, weight_decay=config.weight_decay, seed=config.seed,
        run_dir=work / "unet", checkpoint_every=config.checkpoint_every, desc="unet",
        settings=settings_of(config, vae=vae_digest(vae_dir))))
    return result.seconds


def measure_training_cost(steps: int = 20) -> dict:
    """What training the teacher costs on this machine, measured the same way whatever else runs beside it: each
    stage's seconds per step, timed on a short run of the very training code (the VAE in each of its phases, the
    decoder's fine-tuning with its encoder frozen, and, where either uses a perceptual term, the feature network's
    own training and the term's share) in a scratch folder, times the steps the committed teacher's configs train
    for."""
    vae_config, unet_config, dec_config, feature_config = VAEConfig(), UNetConfig(), decoder_config(), FeatureConfig()
    images = load_fashion_mnist("train")[0][:2560]
    perceptual = vae_config.perceptual_weight > 0 or dec_config.perceptual_weight > 0

    def seconds_per_step(method, run_dir: Path, lr: float) -> float:
        result = train(method, TrainConfig(steps=steps, lr=lr, run_dir=run_dir, checkpoint_every=0, desc="timing"))
        return result.seconds / steps

    def vae_method(vae, config: VAEConfig) -> VAETraining:  # an untrained feature network costs the same
        return VAETraining(vae, images, config, features=FeatureNet(feature_config.channels)
                           if config.perceptual_weight > 0 else None)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        features_spp = seconds_per_step(ContrastiveTraining(FeatureNet(feature_config.channels), images,
                                                            feature_config), tmp / "features",
                                        feature_config.lr) if perceptual else 0.0
        config = dataclasses.replace(vae_config, eval_every=0)
        vae_spp = seconds_per_step(vae_method(build_vae(), config), tmp / "reconstruction", config.lr)
        if vae_config.disc_start is not None:
            adversarial_steps = max(0, vae_config.steps - vae_config.disc_start)
            config = dataclasses.replace(config, disc_start=0)
            adversarial_spp = seconds_per_step(vae_method(build_vae(), config), tmp / "adversarial", config.lr)
            vae_spp += (adversarial_spp - vae_spp) * adversarial_steps / vae_config.steps
        config = dataclasses.replace(dec_config, eval_every=0)
        decoder_spp = seconds_per_step(vae_method(freeze_encoder(build_vae()), config), tmp / "decoder", config.lr)
        tokenizer = build_tokenizer(tmp / "tokenizer")
        text_encoder = build_text_encoder(tokenizer)
        latents = torch.randn(len(images), 4, 8, 8)
        unet_spp = seconds_per_step(UNetTraining(
            build_unet(text_encoder.config.hidden_size), text_encoder, prompt_ids(tokenizer), latents,
            torch.full_like(latents, 0.05), torch.arange(len(images)) % len(CLASS_NAMES), unet_config),
            tmp / "unet", unet_config.lr)
    features_steps = feature_config.steps if perceptual else 0
    return {"vae_seconds_per_step": vae_spp, "vae_steps": vae_config.steps, "vae_batch": vae_config.batch_size,
            "unet_seconds_per_step": unet_spp, "unet_steps": unet_config.steps, "unet_batch": unet_config.batch_size,
            "decoder_seconds_per_step": decoder_spp, "decoder_steps": dec_config.steps,
            "features_seconds_per_step": features_spp, "features_steps": features_steps,
            "seconds": (features_spp * features_steps + vae_spp * vae_config.steps + unet_spp * unet_config.steps
                        + decoder_spp * dec_config.steps),
            "threads": torch.get_num_threads()}


# --- stage: export ---------------------------------------------------------------------------

def export_teacher(work: Path = WORK_DIR, out: Path = TEACHER_DIR) -> None:
    """Assemble the VAE (with its fine-tuned decoder) and the EMA weights of the UNet and text encoder into a
    diffusers pipeline folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vae_dir = work / "decoder" / "model"
    if not (vae_dir / "config.json").is_file():
        raise SystemExit(f"no fine-tuned decoder in {vae_dir}: "
                         "run `python -m direct_distill teacher decoder` first")
    if not (work / "unet" / CHECKPOINT_NAME).is_file() or not (work / "tokenizer" / "vocab.json").is_file():
        raise SystemExit(f"no trained UNet in {work / 'unet'}: run `python -m direct_distill teacher unet` first")
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer", local_files_only=True)
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet(text_encoder.config.hidden_size)
    load_training_state(work / "unet" / CHECKPOINT_NAME, {"ema_unet": unet, "ema_text": text_encoder}, {})
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=text_encoder,
        tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**sd_noise_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    ordinary_permissions(out)
    print(f"teacher written to {out}")


def stage_config(make, steps: int | None = None, **overrides):
    """A stage's config (``make(**overrides)``), shortened to ``steps``: its learning-rate warmup keeps its share
    of the default run's steps, so that a short run is not all warmup (the learning rate never at its peak)."""
    config = make(**overrides)
    if steps is None:
        return config
    full = make()
    return dataclasses.replace(config, steps=steps, warmup_steps=full.warmup_steps * steps // full.steps)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m direct_distill teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["features", "vae", "unet", "decoder", "export"])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the stage's config; its warmup keeps its share of them)")
    parser.add_argument("--perceptual-weight", type=float, default=None,
                        help="vae/decoder: weight of the perceptual term in the lab's own feature network "
                             "(stage features; default 0: none)")
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="checkpoints and intermediate files")
    parser.add_argument("--out", type=Path, default=None, help=f"export: the diffusers folder (default {TEACHER_DIR})")
    args = parser.parse_args(argv)
    if args.out is not None and args.stage != "export":
        parser.error(f"--out applies to the export stage; {args.stage} writes into --work")
    if args.steps is not None and args.stage == "export":
        parser.error("--steps applies to the training stages; export trains nothing")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.perceptual_weight is not None:
        if args.stage not in ("vae", "decoder"):
            parser.error("--perceptual-weight applies to the vae and decoder stages")
        if not 0 <= args.perceptual_weight < float("inf"):
            parser.error("--perceptual-weight must be a finite number >= 0")
    stages = {"features": (train_features, FeatureConfig), "vae": (train_vae, VAEConfig),
              "unet": (train_unet, UNetConfig), "decoder": (train_decoder, decoder_config)}
    if args.stage in stages:
        weight = {"perceptual_weight": args.perceptual_weight} if args.perceptual_weight is not None else {}
        config = stage_config(stages[args.stage][1], args.steps, **weight)
    try:
        if args.stage in stages:
            stages[args.stage][0](config, args.work)
        else:
            export_teacher(args.work, args.out or TEACHER_DIR)
    except (CheckpointMismatch, FileFormatError) as err:  # a stage resumed under other settings, a damaged file
        parser.exit(1, f"{parser.prog} {args.stage}: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\n{parser.prog} {args.stage}: stopped; run the same command again to resume from the "
                         f"last checkpoint in {args.work}\n")


if __name__ == "__main__":
    main()
