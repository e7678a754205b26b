"""The main job on the embedded lab teacher: sample every class with the schedules (and, once
trained and committed, the shortcut and the students) and write a labelled comparison sheet."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..schedulers import exp_karras_sigmas, karras_sigmas, sigma_table
from . import CLASSIFIER_PATH, SHORTCUT_PATH, STUDENTS_DIR


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m direct_distill demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("direct_distill_demo"))
    parser.add_argument("--steps", type=int, default=8, help="DPM++ 2M steps for the schedule comparison")
    parser.add_argument("--guidance", type=float, default=None, help="CFG (default: the teacher's best, from the lab)")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.per_class < 1:
        parser.error("--steps and --per-class must be >= 1")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 1):
        parser.error(f"--guidance must be a finite number >= 1 (1: no guidance), got {args.guidance}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")

    from .benchmark import Results, ResultsFileError, save_grid, student_row_name
    from .sampling import sample_teacher, load_teacher

    guidance = args.guidance
    if guidance is None:
        try:
            guidance = Results.load().best_guidance or 2.0
        except ResultsFileError as err:
            parser.exit(1, f"{parser.prog}: {err}; or pass --guidance\n")
    pipe = load_teacher()
    ac = pipe.scheduler.alphas_cumprod
    table = sigma_table(ac)
    runs = {
        f"karras_{args.steps}": karras_sigmas(args.steps, float(table[0]), float(table[-1])),
        f"exp_karras_{args.steps}": exp_karras_sigmas(args.steps, 1.0, alphas_cumprod=ac),
        "exp_karras_20": exp_karras_sigmas(20, 1.0, alphas_cumprod=ac),
    }
    callbacks = {}
    if SHORTCUT_PATH.is_file():
        from ..pipelines import ShortcutCallback

        # Seed 000's "7+1": seven teacher steps of a run of the schedule and length the shortcut learnt to finish
        # from step 7 (11 beta steps for the committed one), then the NAFNet shortcut.
        callback = ShortcutCallback(SHORTCUT_PATH, handoff_step=7)
        captured = callback.shortcut.metadata["extra"]["captured"]
        steps = next((c["num_inference_steps"] for c in captured if 7 in c["capture_steps"]), 12)
        runs["shortcut_7+1"] = torch.tensor(callback.sigmas(steps, pipe.scheduler))
        callbacks["shortcut_7+1"] = callback
    evaluator = None
    if CLASSIFIER_PATH.is_file():
        from .evaluator import Evaluator

        evaluator = Evaluator()
    args.out.mkdir(parents=True, exist_ok=True)
    n = 10 * args.per_class
    for name, sigmas in runs.items():
        s = sample_teacher(pipe, sigmas, guidance, n, args.seed, callback=callbacks.get(name), desc=name)
        path = args.out / f"{name}.png"
        steps = callbacks[name].handoff_step if name in callbacks else len(sigmas) - 1
        save_grid(s.images, s.labels, path, per_class=args.per_class,
                  title=f"{name}: {steps} UNet steps, guidance {guidance:g}")
        acc = f", class accuracy {evaluator.accuracy(s.images, s.labels):.2f}" if evaluator else ""
        print(f"{name:16s} {steps:3d} UNet steps, {s.seconds_per_image * 1e3:6.1f} ms/image{acc} -> {path}")
    # Every committed student at its default NFE and recommended guidance, through the public loader.
    from ..pipelines import load_student

    for path in sorted(STUDENTS_DIR.glob("*.safetensors")):
        student_pipe = load_teacher()
        info = load_student(student_pipe, path)
        name = f"{student_row_name(path)}_{info.default_nfe}nfe"
        s = sample_teacher(student_pipe, None, info.guidance, n, args.seed, steps=info.default_nfe, desc=name)
        out = args.out / f"{name}.png"
        save_grid(s.images, s.labels, out, per_class=args.per_class,
                  title=f"{info.method} student: {info.default_nfe} UNet steps, guidance {info.guidance:g}")
        acc = f", class accuracy {evaluator.accuracy(s.images, s.labels):.2f}" if evaluator else ""
        print(f"{name:16s} {info.default_nfe:3d} UNet steps, {s.seconds_per_image * 1e3:6.1f} ms/image{acc} -> {out} "
              f"({info.method} student, guidance {info.guidance:g})")
    print(f"each sheet: one row per class, named on its left; guidance {guidance:g} for the teacher")


if __name__ == "__main__":
    main()
