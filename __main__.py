"""`python -m direct_distill <command>`: demo, benchmark, distill."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": ("direct_distill.lab.demo", "sample the embedded lab teacher with every capability that is built"),
        "benchmark": ("direct_distill.lab.benchmark", "measure schedules, shortcut and students; write lab/REPORT.md"),
        "teacher": ("direct_distill.lab.teacher", "train the lab teacher (vae | unet | export)"),
        "classifier": ("direct_distill.lab.evaluator", "train the lab's evaluation classifier"),
        "distill": ("direct_distill.training.cli", "distil a teacher: shortcut, progressive, sfd, gdd, disback"),
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

    result = import_module(commands[argv[0]][0]).main(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
