"""`python -m direct_distill distill <method>`: distil a diffusers teacher (CPU, one GPU, or `accelerate launch`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_teacher(path: str | Path, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a folder (any text-to-image pipeline) or an SD1.x single file."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(path)
    elif path.is_file():
        pipe = StableDiffusionPipeline.from_single_file(path)
    else:
        raise SystemExit(f"{path}: no such teacher folder or file")
    # Cast after loading: the loaders' dtype argument changed name across diffusers versions.
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m direct_distill distill", description=__doc__)
    sub = parser.add_subparsers(dest="method", required=True, metavar="method")
    shortcut_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
