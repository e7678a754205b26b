"""`python -m direct_distill distill <method>`: distil a diffusers teacher (CPU, one GPU, or `accelerate launch`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .teachers import DTYPES, load_teacher


def shortcut_parser(sub) -> None:
    from ..lab import SHORTCUT_PATH, TEACHER_DIR
    from .shortcut import ShortcutConfig

    d = ShortcutConfig()
    p = sub.add_parser("shortcut", help="the two-stage NAFNet final-step shortcut (seed 000)",
                       description="Capture teacher trajectories, train both NAFNet stages, write one "
                                   "shortcut file. Re-running the same command resumes.")
    p.add_argument("--teacher", type=Path, default=TEACHER_DIR, help="diffusers folder (default: the lab teacher)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"shortcut file (default for the lab teacher: {SHORTCUT_PATH})")
    p.add_argument("--work", type=Path, default=None,
                   help="trajectories and checkpoints (default: lab/work/shortcut for the lab teacher, "
                        "else <out>.work)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="one prompt per line (default: the lab's ten class names)")
    p.add_argument("--trajectories", type=int, default=2000, help="teacher runs to capture")
    p.add_argument("--guidance", type=float, default=None,
                   help="teacher CFG (default: 2.0 for the lab teacher, else 7.5)")
    p.add_argument("--steps", type=int, default=20, help="teacher steps per run (exp-Karras DPM++ 2M)")
    p.add_argument("--capture-steps", type=int, nargs="+", default=[10, 11, 12],
                   help="keep the latent after this many teacher steps")
    p.add_argument("--exp-karras-p", type=float, default=1.0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--sample-batch-size", type=int, default=250, help="trajectories per teacher call")
    p.add_argument("--shard-size", type=int, default=500, help="trajectories per file")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="teacher dtype")
    p.add_argument("--preset", choices=["lab", "paper"], default="lab", help="NAFNet sizes of both stages")
    p.add_argument("--no-stage2", action="store_true", help="train stage 1 only")
    p.add_argument("--stage1-steps", type=int, default=d.stage1_steps)
    p.add_argument("--stage2-steps", type=int, default=d.stage2_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch (per process)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--holdout", type=float, default=d.holdout, help="fraction of trajectories held out for PSNR")
    p.add_argument("--band-margin", type=float, default=d.band_margin,
                   help="widen the captured t-range by this fraction of its width on each side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--tensorboard", action="store_true", help="log to <work>/stage*/tensorboard")
    p.set_defaults(run=run_shortcut)


def run_shortcut(args) -> int:
    from accelerate import Accelerator

    from ..lab import SHORTCUT_PATH, TEACHER_DIR
    from ..lab.data import CLASS_NAMES
    from .shortcut import ShortcutConfig, train_shortcut
    from .trajectories import capture_trajectories, read_prompts

    lab = args.teacher.resolve() == TEACHER_DIR.resolve()
    out = args.out or (SHORTCUT_PATH if lab else None)
    if out is None:
        raise SystemExit("--out is required for a teacher other than the lab's")
    work = args.work or (Path(__file__).resolve().parents[1] / "lab" / "work" / "shortcut" if lab
                         else out.with_suffix(".work"))
    prompts = read_prompts(args.prompts) if args.prompts else list(CLASS_NAMES)
    guidance = args.guidance if args.guidance is not None else (2.0 if lab else 7.5)

    accelerator = Accelerator()
    pipe = load_teacher(args.teacher, DTYPES[args.dtype]).to(accelerator.device)
    from ..schedulers import ExpKarrasScheduler

    scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config, exp_karras_p=args.exp_karras_p)
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    capture_trajectories(pipe, work / "trajectories", prompts, args.trajectories, num_inference_steps=args.steps,
                         capture_steps=args.capture_steps, guidance_scale=guidance, seed=args.seed,
                         scheduler=scheduler, shard_size=args.shard_size, batch_size=args.sample_batch_size,
                         teacher="lab/assets/teacher" if lab else str(args.teacher), pipe_kwargs=size,
                         process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    accelerator.wait_for_everyone()
    del pipe

    config = ShortcutConfig(
        stage1_preset=f"{args.preset}_stage1", stage2_preset=None if args.no_stage2 else f"{args.preset}_stage2",
        stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, batch_size=args.batch_size, lr=args.lr,
        holdout=args.holdout, band_margin=args.band_margin, seed=args.seed,
        checkpoint_every=args.checkpoint_every, tensorboard=args.tensorboard)
    result = train_shortcut(work / "trajectories", out, config=config, work_dir=work, accelerator=accelerator)
    if accelerator.is_main_process:
        lo, hi = result.t_band
        print(f"shortcut written to {result.path} (t-band [{lo:.1f}, {hi:.1f}])")
    return 0


def _lora_arguments(p, lora) -> None:
    p.add_argument("--rank", type=int, default=lora.rank, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=lora.alpha, help="LoRA alpha (the update is alpha/rank B A)")
    p.add_argument("--target-modules", nargs="+", default=list(lora.target_modules),
                   help="UNet modules that get the LoRA (peft name matching)")


def _shared_arguments(p, method: str, d, lora, p_uncond_help: str, lr_help: str | None = None) -> None:
    """Teacher, files, optimisation, LoRA and logging: the arguments every LoRA-student method takes."""
    from ..lab import STUDENTS_DIR, TEACHER_DIR

    p.add_argument("--teacher", type=Path, default=TEACHER_DIR,
                   help="diffusers folder or SD1.x single file (default: the lab teacher)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"student file (default for the lab teacher: {STUDENTS_DIR / (method + '.safetensors')})")
    p.add_argument("--work", type=Path, default=None,
                   help=f"checkpoints (default: lab/work/{method} for the lab teacher, else <out>.work)")
    p.add_argument("--prompts", type=Path, default=None, help="one prompt per line (default: the lab's class names)")
    p.add_argument("--p-uncond", type=float, default=d.p_uncond, help=p_uncond_help)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch (per process)")
    p.add_argument("--lr", type=float, default=d.lr, help=lr_help)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    _lora_arguments(p, lora)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="teacher dtype (the LoRA stays float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--tensorboard", action="store_true", help="log to <work>/.../tensorboard")


def _common_arguments(p, method: str, d) -> None:
    """The arguments of the few-step methods (progressive, sfd)."""
    _shared_arguments(p, method, d, d.lora, "fraction of empty prompts during distillation (keeps CFG usable)")
    p.add_argument("--guidance", type=float, default=None,
                   help="the CFG recorded as recommended (default: 2.0 for the lab teacher, else 7.5); "
                        "distillation itself runs at guidance 1")


def _setup(args, method: str):
    """(lab?, out, work, guidance, prompts or None) from the shared arguments."""
    from ..lab import STUDENTS_DIR, TEACHER_DIR
    from ..lab.data import CLASS_NAMES
    from .trajectories import read_prompts

    lab = args.teacher.resolve() == TEACHER_DIR.resolve()
    out = args.out or (STUDENTS_DIR / f"{method}.safetensors" if lab else None)
    if out is None:
        raise SystemExit("--out is required for a teacher other than the lab's")
    work = args.work or (Path(__file__).resolve().parents[1] / "lab" / "work" / method if lab
                         else out.with_suffix(".work"))
    guidance = args.guidance if args.guidance is not None else (2.0 if lab else 7.5)
    prompts = read_prompts(args.prompts) if args.prompts else (list(CLASS_NAMES) if lab else None)
    return lab, out, work, guidance, prompts


def _lora_spec(args):
    from .lora import LoraSpec

    return LoraSpec(rank=args.rank, alpha=args.alpha, target_modules=tuple(args.target_modules))


def progressive_parser(sub) -> None:
    from .progressive import ProgressiveConfig

    d = ProgressiveConfig()
    p = sub.add_parser("progressive", help="progressive distillation into a LoRA student (seed 003)",
                       description="Rounds of two teacher DDIM steps -> one student step, N -> N/2, from "
                                   "--teacher-steps down to --student-steps. Writes the final student to --out "
                                   "and each earlier round's beside it (<out>_nfe<N>). Re-running resumes.")
    _common_arguments(p, "progressive", d)
    p.add_argument("--latents", type=Path, default=None,
                   help="data: a safetensors file with 'latents' (N, C, H, W), VAE latents times the scaling "
                        "factor, and optionally their posterior 'std'; --prompts then holds one prompt per latent "
                        "or one for all (default for the lab teacher: Fashion-MNIST encoded by its VAE)")
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps, help="DDIM steps of the first teacher")
    p.add_argument("--student-steps", type=int, default=d.student_steps, help="steps of the final student")
    p.add_argument("--steps-per-round", type=int, default=d.steps_per_round)
    p.add_argument("--weighting", choices=["truncated_snr", "snr+1"], default=d.weighting,
                   help="loss weight on the x-space error: max(SNR, 1), or SNR + 1 (the v-space MSE)")
    p.add_argument("--no-save-rounds", action="store_true", help="write the final student only")
    p.set_defaults(run=run_progressive)


def lab_latent_data(pipe, work: Path, device):
    """Fashion-MNIST (train) encoded by the teacher's VAE, cached in ``work``, with class-name prompts."""
    from ..lab.data import CLASS_NAMES, load_fashion_mnist
    from ..lab.teacher import encode_dataset
    from ..models.io import atomic_save_file, read_safetensors
    from .progressive import LatentData

    cache = work / "data_latents.safetensors"
    checksum = str(float(sum(p.double().sum() for p in pipe.vae.parameters())))
    tensors, meta = read_safetensors(cache) if cache.is_file() else ({}, {})
    if meta.get("vae_checksum") != checksum:
        images, labels = load_fashion_mnist("train")
        vae = pipe.vae.to(device).float()
        mean, std = encode_dataset(vae, images.to(device))
        tensors = {"latents": mean.cpu(), "std": std.cpu(), "labels": labels}
        atomic_save_file(tensors, cache, {"vae_checksum": checksum})
    return LatentData(tensors["latents"], [CLASS_NAMES[i] for i in tensors["labels"].tolist()],
                      latent_std=tensors["std"])


def run_progressive(args) -> int:
    from accelerate import Accelerator

    from ..models.io import read_safetensors
    from .progressive import LatentData, ProgressiveConfig, train_progressive

    lab, out, work, guidance, prompts = _setup(args, "progressive")
    accelerator = Accelerator()
    pipe = load_teacher(args.teacher, DTYPES[args.dtype])
    if args.latents is not None:
        tensors, _ = read_safetensors(args.latents)
        if "latents" not in tensors:
            raise SystemExit(f"{args.latents}: no 'latents' tensor")
        data = LatentData(tensors["latents"], prompts, latent_std=tensors.get("std"))
    elif lab:
        with accelerator.main_process_first():
            data = lab_latent_data(pipe, work, accelerator.device)
    else:
        raise SystemExit("progressive distillation trains on data: pass --latents (a safetensors file with a "
                         "'latents' tensor of VAE latents times the scaling factor)")
    config = ProgressiveConfig(
        teacher_steps=args.teacher_steps, student_steps=args.student_steps, steps_per_round=args.steps_per_round,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, lora=_lora_spec(args),
        weighting=args.weighting, p_uncond=args.p_uncond, guidance=guidance, save_rounds=not args.no_save_rounds,
        seed=args.seed, checkpoint_every=args.checkpoint_every, tensorboard=args.tensorboard)
    result = train_progressive(pipe, data, out, config=config, work_dir=work, accelerator=accelerator,
                               teacher="lab/assets/teacher" if lab else str(args.teacher))
    if accelerator.is_main_process:
        for n, path in sorted(result.round_paths.items(), reverse=True):
            print(f"{n}-step student written to {path}")
    return 0


def sfd_parser(sub) -> None:
    from .sfd import SFDConfig

    d = SFDConfig()
    p = sub.add_parser("sfd", help="SFD: one LoRA student for several NFEs along its own trajectory (seed 004)",
                       description="The student takes first-order steps at its few timesteps from its own latent; "
                                   "the target is a multi-step DPM-Solver++ teacher between them. Re-running "
                                   "resumes.")
    _common_arguments(p, "sfd", d)
    p.add_argument("--nfe", type=int, nargs="+", default=list(d.nfes), help="the step counts the student serves")
    p.add_argument("--default-nfe", type=int, default=d.default_nfe)
    p.add_argument("--schedule-p", type=float, default=d.schedule_p,
                   help="0: trailing timesteps uniform in t (999, 749, 499, 249); > 0: exp-Karras-like spacing")
    p.add_argument("--teacher-substeps", type=int, default=d.teacher_substeps,
                   help="DPM-Solver++(2M) teacher steps per student step")
    p.add_argument("--teacher-from", choices=["teacher", "student"], default=d.teacher_from,
                   help="the teacher continues its own trajectory (Algorithm 2) or restarts from the student's")
    p.add_argument("--distance", choices=["l1", "l2"], default=d.distance)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--latent-size", type=int, default=None, help="latent height = width (default: the UNet's)")
    p.set_defaults(run=run_sfd)


def run_sfd(args) -> int:
    from accelerate import Accelerator

    from .sfd import SFDConfig, train_sfd

    lab, out, work, guidance, prompts = _setup(args, "sfd")
    if prompts is None:
        raise SystemExit("--prompts is required for a teacher other than the lab's")
    config = SFDConfig(
        nfes=tuple(args.nfe), default_nfe=args.default_nfe, schedule_p=args.schedule_p,
        teacher_substeps=args.teacher_substeps, teacher_from=args.teacher_from, distance=args.distance,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        lora=_lora_spec(args), p_uncond=args.p_uncond, guidance=guidance, latent_size=args.latent_size,
        seed=args.seed, checkpoint_every=args.checkpoint_every, tensorboard=args.tensorboard)
    accelerator = Accelerator()
    pipe = load_teacher(args.teacher, DTYPES[args.dtype])
    result = train_sfd(pipe, prompts, out, config=config, work_dir=work, accelerator=accelerator,
                       teacher="lab/assets/teacher" if lab else str(args.teacher))
    if accelerator.is_main_process:
        print(f"SFD student (NFE {', '.join(map(str, sorted(set(args.nfe))))}) written to {result.path}")
    return 0


def _one_step_arguments(p, method: str, d, lora) -> None:
    """The arguments of the one-step methods (gdd, disback): a 1-step student samples at guidance 1."""
    _shared_arguments(p, method, d, lora, "fraction of empty prompts during training", "generator learning rate")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between FD / accuracy evaluations of the student (lab teacher only; default 500 "
                        "there, 0 turns them off)")
    p.add_argument("--eval-samples", type=int, default=1000, help="samples per evaluation (balanced over classes)")
    p.add_argument("--keep-last", action="store_true",
                   help="write the last generator, not the one of the lowest FD among the evaluations")
    p.set_defaults(guidance=1.0)  # what _setup reads: a one-step student samples at guidance 1


def _one_step_evaluation(args, lab: bool, pipe):
    """(eval_every, evaluate hook): the lab's FD and accuracy, which only the lab teacher has."""
    every = args.eval_every if args.eval_every is not None else (500 if lab else 0)
    if every and not lab:
        raise SystemExit("--eval-every needs the lab's evaluator: it is for the lab teacher only")
    return every, (lab_evaluation(pipe, args.eval_samples) if every else None)


def lab_evaluation(pipe, samples: int = 1000):
    """An evaluate hook for the one-step methods: FD (lab classifier features, against the test set) and class
    accuracy of ``samples`` student samples, balanced over the ten classes, decoded by the teacher's VAE."""
    from ..lab.data import CLASS_NAMES
    from ..lab.evaluator import Evaluator
    from ..lab.sampling import decode

    evaluator = Evaluator()
    labels = torch.arange(samples) % len(CLASS_NAMES)
    prompts = [CLASS_NAMES[i] for i in labels.tolist()]

    def evaluate(step: int, generate) -> dict[str, float]:
        latents = generate(prompts)
        images = decode(pipe, latents.to(pipe.vae.device, pipe.vae.dtype)).float().cpu()
        return {"fd": evaluator.fd(images), "accuracy": evaluator.accuracy(images, labels)}

    return evaluate


def folder_latent_data(pipe, folder: Path, work: Path, device):
    """A folder of captioned images (``read_image_folder``) encoded by the teacher's VAE at the UNet's size, cached
    in ``work`` (re-encoded when the VAE or the folder's files change), as posterior-sampled training latents."""
    import hashlib
    import json

    from ..lab.teacher import encode_dataset
    from ..models.io import atomic_save_file, read_safetensors
    from .gdd import load_images, read_image_folder
    from .progressive import LatentData

    paths, prompts = read_image_folder(folder)
    vae = pipe.vae.to(device).float()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    listing = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    checksum = str(float(sum(p.detach().double().sum() for p in vae.parameters())))
    key = hashlib.sha256(json.dumps([checksum, size, listing, prompts]).encode()).hexdigest()
    cache = work / "folder_latents.safetensors"
    tensors, meta = read_safetensors(cache) if cache.is_file() else ({}, {})
    if meta.get("data_key") != key:
        means, stds = [], []
        for i in range(0, len(paths), 64):
            mean, std = encode_dataset(vae, load_images(paths[i:i + 64], vae.config.in_channels, size).to(device))
            means.append(mean.cpu())
            stds.append(std.cpu())
        tensors = {"latents": torch.cat(means), "std": torch.cat(stds)}
        atomic_save_file(tensors, cache, {"data_key": key})
    return LatentData(tensors["latents"], prompts, latent_std=tensors["std"])


def gdd_parser(sub) -> None:
    from .gdd import GAN_LOSSES, VARIANTS, GDDConfig
    from .lora import LoraSpec

    d = GDDConfig()
    p = sub.add_parser("gdd", help="GDD / GDD-I: a one-step student trained by a GAN loss on real data (seed 001)",
                       description="A one-step generator (teacher + LoRA at t = T - 1) trained by a GAN loss alone "
                                   "against real data latents; the discriminator is the frozen teacher UNet's "
                                   "features plus small conv heads. GDD-I (the default) keeps every convolution "
                                   "frozen and without LoRA; GDD puts the LoRA on convolutions too. Without "
                                   "--target-modules the LoRA goes where the variant says. Re-running resumes.")
    _one_step_arguments(p, "gdd", d, LoraSpec(d.lora_rank, d.lora_alpha, d.target_modules))
    p.add_argument("--variant", choices=list(VARIANTS), default=d.variant)
    p.add_argument("--data", type=Path, default=None,
                   help="a folder of images, each captioned by a .txt of the same name (image.png + image.txt), "
                        "encoded by the teacher's VAE (default for the lab teacher: Fashion-MNIST)")
    p.add_argument("--latents", type=Path, default=None,
                   help="instead of --data: a safetensors file with 'latents' (N, C, H, W), VAE latents times the "
                        "scaling factor, and optionally their posterior 'std'; --prompts holds one prompt per latent "
                        "or one for all")
    p.add_argument("--disc-lr", type=float, default=d.disc_lr, help="discriminator heads' learning rate")
    p.add_argument("--gan-loss", choices=list(GAN_LOSSES), default=d.gan_loss)
    p.add_argument("--r1-gamma", type=float, default=d.r1_gamma, help="R1 weight on real latents (0: none)")
    p.add_argument("--r1-every", type=int, default=d.r1_every, help="lazy R1: applied every this many steps")
    p.add_argument("--disc-timesteps", type=int, nargs=2, default=list(d.disc_timesteps), metavar=("LO", "HI"),
                   help="the discriminator reads samples noised to a timestep uniform in [LO, HI]")
    p.add_argument("--disc-hidden", type=int, default=d.disc_hidden, help="channels of each discriminator head")
    p.set_defaults(run=run_gdd)


def run_gdd(args) -> int:
    from accelerate import Accelerator

    from ..models.io import read_safetensors
    from .gdd import GDDConfig, read_image_folder, train_gdd
    from .progressive import LatentData

    lab, out, work, _, prompts = _setup(args, "gdd")
    if args.data is not None and args.latents is not None:
        raise SystemExit("pass --data or --latents, not both")
    if args.data is not None:
        try:
            read_image_folder(args.data)  # a missing or empty folder fails before the teacher is loaded
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(str(err)) from None
    elif args.latents is None and not lab:
        raise SystemExit("GDD trains on real data: pass --data FOLDER (images with same-name .txt captions) or "
                         "--latents FILE (a safetensors file with a 'latents' tensor)")
    accelerator = Accelerator()
    pipe = load_teacher(args.teacher, DTYPES[args.dtype])
    if args.data is not None:
        with accelerator.main_process_first():
            data = folder_latent_data(pipe, args.data, work, accelerator.device)
    elif args.latents is not None:
        tensors, _ = read_safetensors(args.latents)
        if "latents" not in tensors:
            raise SystemExit(f"{args.latents}: no 'latents' tensor")
        data = LatentData(tensors["latents"], prompts, latent_std=tensors.get("std"))
    else:
        with accelerator.main_process_first():
            data = lab_latent_data(pipe, work, accelerator.device)
    eval_every, evaluate = _one_step_evaluation(args, lab, pipe)
    config = GDDConfig(
        variant=args.variant, steps=args.steps, batch_size=args.batch_size, lr=args.lr, disc_lr=args.disc_lr,
        warmup_steps=args.warmup_steps, lora_rank=args.rank, lora_alpha=args.alpha,
        target_modules=tuple(args.target_modules), gan_loss=args.gan_loss, r1_gamma=args.r1_gamma,
        r1_every=args.r1_every,
        disc_timesteps=tuple(args.disc_timesteps), disc_hidden=args.disc_hidden, p_uncond=args.p_uncond,
        eval_every=eval_every, keep_best=not args.keep_last, seed=args.seed, checkpoint_every=args.checkpoint_every,
        tensorboard=args.tensorboard)
    try:
        config.lora_spec(pipe.unet)  # e.g. GDD-I refuses convolutions as targets
    except ValueError as err:
        raise SystemExit(str(err)) from None
    result = train_gdd(pipe, data, out, config=config, work_dir=work, accelerator=accelerator, evaluate=evaluate,
                       teacher="lab/assets/teacher" if lab else str(args.teacher))
    if accelerator.is_main_process:
        print(f"{args.variant.upper()} one-step student written to {result.path}")
    return 0


def disback_parser(sub) -> None:
    from .disback import DisBackConfig

    d = DisBackConfig()
    p = sub.add_parser("disback", help="DisBack: one-step score distillation along a recorded degradation path "
                                       "(seed 002)",
                       description="Stage one tunes a copy of the teacher toward the initial one-step generator's "
                                   "samples and records --path-checkpoints nodes; stage two trains the generator by "
                                   "score distillation (a LoRA fake score) against those nodes, last first, "
                                   "--steps-per-node each, then against the teacher. Re-running resumes.")
    _one_step_arguments(p, "disback", d, d.lora)
    p.add_argument("--degradation-steps", type=int, default=d.degradation_steps, help="length of stage one")
    p.add_argument("--path-checkpoints", type=int, default=d.path_checkpoints,
                   help="nodes recorded along the degradation path (evenly spaced); 0 turns backtracking off "
                        "(no stage one: the fake score starts as the teacher, the baseline the paper compares to)")
    p.add_argument("--steps-per-node", type=int, default=d.steps_per_node,
                   help="stage-two steps against each node; the rest of --steps distils the teacher")
    p.add_argument("--fake-lr", type=float, default=d.fake_lr, help="fake score's learning rate")
    p.add_argument("--degradation-lr", type=float, default=d.degradation_lr)
    p.add_argument("--fake-updates", type=int, default=d.fake_updates,
                   help="fake-score updates per generator update")
    p.add_argument("--real-guidance", type=float, default=None,
                   help="CFG of the real score (default: 2.0 for the lab teacher, else 7.5); the student then "
                        "samples at guidance 1")
    p.add_argument("--score-timesteps", type=int, nargs=2, default=list(d.score_timesteps), metavar=("LO", "HI"),
                   help="the generator's loss noises its samples to a timestep uniform in [LO, HI]")
    p.add_argument("--latent-size", type=int, default=None, help="latent height = width (default: the UNet's)")
    p.set_defaults(run=run_disback)


def run_disback(args) -> int:
    from accelerate import Accelerator

    from .disback import DisBackConfig, train_disback

    lab, out, work, _, prompts = _setup(args, "disback")
    if prompts is None:
        raise SystemExit("--prompts is required for a teacher other than the lab's")
    config = DisBackConfig(
        degradation_steps=args.degradation_steps, path_checkpoints=args.path_checkpoints,
        steps_per_node=args.steps_per_node, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        fake_lr=args.fake_lr, degradation_lr=args.degradation_lr, fake_updates=args.fake_updates,
        warmup_steps=args.warmup_steps, lora=_lora_spec(args), score_timesteps=tuple(args.score_timesteps),
        real_guidance=args.real_guidance if args.real_guidance is not None else (2.0 if lab else 7.5),
        p_uncond=args.p_uncond, latent_size=args.latent_size, keep_best=not args.keep_last, seed=args.seed,
        checkpoint_every=args.checkpoint_every, tensorboard=args.tensorboard)
    try:
        config.schedule()
        config.node_steps()
    except ValueError as err:
        raise SystemExit(str(err)) from None
    accelerator = Accelerator()
    pipe = load_teacher(args.teacher, DTYPES[args.dtype])
    config.eval_every, evaluate = _one_step_evaluation(args, lab, pipe)
    result = train_disback(pipe, prompts, out, config=config, work_dir=work, accelerator=accelerator,
                           evaluate=evaluate, teacher="lab/assets/teacher" if lab else str(args.teacher))
    if accelerator.is_main_process:
        print(f"DisBack one-step student written to {result.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m direct_distill distill", description=__doc__)
    sub = parser.add_subparsers(dest="method", required=True, metavar="method")
    shortcut_parser(sub)
    progressive_parser(sub)
    sfd_parser(sub)
    gdd_parser(sub)
    disback_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
