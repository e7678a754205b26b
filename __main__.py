"""`python -m direct_distill <command>`: demo, benchmark, teacher, classifier, rebuild, latents, distill, stamp."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": ("direct_distill.lab.demo", "sample the embedded lab teacher with every capability that is built"),
        "benchmark": ("direct_distill.lab.benchmark", "measure schedules, shortcut and students; write lab/REPORT.md"),
        "teacher": ("direct_distill.lab.teacher", "train the lab teacher (features | vae | unet | decoder | export)"),
        "classifier": ("direct_distill.lab.evaluator", "train the lab's evaluation classifier"),
        "rebuild": ("direct_distill.lab.rebuild", "rebuild the whole lab (teacher, shortcut, students, report), "
                                                  "resumable"),
        "latents": ("direct_distill.training.latents", "encode an image folder into the latents file the data "
                                                       "methods train on"),
        "distill": (distill, "distil a teacher (distill --help lists the methods)"),
        "stamp": ("direct_distill.models.stamp", "write a few-step LoRA's preset into its file (--list: the presets)"),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m direct_distill <command> [options]\n\ncommands:")
        for name, (_, text) in commands.items():
            print(f"  {name:<11} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    from importlib import import_module

    from .lab import LabInputMissing  # (the lab package itself imports nothing heavy)

    target = commands[argv[0]][0]
    try:
        result = target(argv[1:]) if callable(target) else import_module(target).main(argv[1:])
    except LabInputMissing as err:  # the lab's data or teacher is missing: what to install or run, in one line
        print(f"python -m direct_distill {argv[0]}: {err}", file=sys.stderr)
        return 1
    return int(result or 0)


def distill(argv: list[str]) -> int:
    """The training command line with the lab's defaults handed in (training/ itself knows no lab)."""
    from .lab.distill_preset import LAB
    from .training.cli import main

    return main(argv, preset=LAB)


if __name__ == "__main__":
    sys.exit(main())
