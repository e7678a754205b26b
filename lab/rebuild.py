"""`python -m direct_distill rebuild`: the whole lab from the Fashion-MNIST files, by the committed commands.

The teacher's stages, then the shortcut and every student of ``lab/assets`` and the report, each step a
``python -m direct_distill`` command in its own process on one thread (the committed files were made so), at most
``--jobs`` at a time, each as soon as the steps it reads from are done; the last, the benchmark's shortcut, student
and goal rows, runs alone on ``--jobs`` threads (sampling: the thread count moves its figures by rounding only, and
its timing of the teacher's training sets the students' own thread count). Every step checkpoints and resumes, so an
interrupted rebuild continues where it stopped when run again; a step that finished resumes to a no-op (the
benchmark re-measures its floors and CFG sweep, minutes, and samples only the rows still missing).

Two things a retrained teacher changes are handled here, never silently:
- a student's work folder holding a run on another teacher (its ``settings.json`` records the teacher's weights)
  is moved aside to ``<folder>.other-teacher-<n>``, not deleted, and the student starts over;
- ``lab/results.json`` holding another teacher's rows is started anew (``benchmark --fresh``; git keeps the old).

The evaluation classifier does not depend on the teacher and is kept if present. Each step's output goes to
``lab/work/rebuild/<step>.log``. On this 2-core CPU at two jobs, from the seconds the report records: about 9 hours,
the teacher 3.5, then 2.5 of the benchmark's teacher rows beside 5.5 of shortcut and students' training, and last,
alone on both threads, the shortcut's and students' rows and the goals group's seven more seed sets (53 min of it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import CLASSIFIER_PATH, TEACHER_DIR

ROOT = Path(__file__).resolve().parent.parent  # the package folder: the README's paths are relative to it
LOGS = ROOT / "lab" / "work" / "rebuild"

# The committed shortcut and students, as the README gives them (tests hold the two to each other).
DISTILL_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("shortcut", "--schedule", "beta", "--teacher-steps", "19", "11", "--trajectories", "32000",
     "--stage1-steps", "12000", "--nafnet", "lab_wide", "--no-stage2", "--save-dtype", "float16"),
    ("progressive", "--teacher-steps", "16", "--student-steps", "1", "--steps-per-round", "600",
     "--lr", "2e-3", "--save-dtype", "float16"),
    ("progressive", "--teacher-steps", "16", "--student-steps", "1", "--steps-per-round", "600",
     "--lr", "2e-3", "--student-prediction", "v_prediction", "--save-dtype", "float16", "--no-save-rounds",
     "--out", "lab/assets/students/progressive_v.safetensors", "--work", "lab/work/progressive_v"),
    ("sfd", "--nfe", "2", "4", "--default-nfe", "4", "--steps", "800", "--schedule-p", "0.5", "--lr", "1e-3"),
    ("sfd", "--nfe", "2", "--default-nfe", "2", "--steps", "1500", "--schedule-p", "0.5", "--lr", "1e-3",
     "--rank", "32", "--alpha", "32", "--save-dtype", "float16", "--out", "lab/assets/students/sfd_2step.safetensors",
     "--work", "lab/work/sfd_2step"),
    ("sfd", "--nfe", "1", "--default-nfe", "1", "--steps", "6000", "--lr", "1e-3", "--teacher-substeps", "8",
     "--distance", "l2", "--p-uncond", "0", "--rank", "64", "--alpha", "64", "--pool", "16384",
     "--student-prediction", "v_prediction", "--save-dtype", "float16",
     "--out", "lab/assets/students/sfd_1step.safetensors", "--work", "lab/work/sfd_1step"),
    ("gdd", "--steps", "3000", "--eval-every", "200", "--student-prediction", "v_prediction"),
    ("disback", "--steps", "2000", "--steps-per-node", "200", "--eval-every", "200",
     "--target-modules", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
     "--student-prediction", "v_prediction"),
    ("disback", "--steps", "2000", "--path-checkpoints", "0", "--eval-every", "200",
     "--target-modules", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
     "--student-prediction", "v_prediction", "--out", "lab/assets/students/disback_no_backtracking.safetensors",
     "--work", "lab/work/disback_no_backtracking"),
)


@dataclass
class Step:
    """One command of the rebuild: ``python -m direct_distill <argv>``, once every step in ``after`` is done."""

    name: str
    argv: tuple[str, ...]
    after: tuple[str, ...] = ()
    work: Path | None = field(default=None, compare=False)  # a distill run's work folder (checked before it runs)
    # starts once no other step runs, none beside it, on every job's thread (sampling rows, whose figures the
    # thread count moves by rounding only; training keeps one thread: the committed files were made so)
    alone: bool = False


def distill_work(argv: tuple[str, ...]) -> Path:
    """Where a lab `distill` command keeps its work: ``--work`` or the preset's ``lab/work/<method>``."""
    from .distill_preset import lab_work

    if "--work" in argv:
        return ROOT / argv[argv.index("--work") + 1]
    return lab_work(argv[0])


def distill_name(argv: tuple[str, ...]) -> str:
    """A step's name: its output file's stem (``progressive_v``), else the method."""
    return Path(argv[argv.index("--out") + 1]).stem if "--out" in argv else argv[0]


def plan(perceptual: bool | None = None, classifier: bool | None = None) -> list[Step]:
    """The rebuild's steps in a valid order. ``perceptual``: whether the teacher's VAE or decoder configs use the
    feature network (default: read from them); ``classifier``: whether the evaluator is still to be trained
    (default: its file is missing)."""
    from .teacher import VAEConfig, decoder_config

    if perceptual is None:
        perceptual = VAEConfig().perceptual_weight > 0 or decoder_config().perceptual_weight > 0
    if classifier is None:
        classifier = not CLASSIFIER_PATH.is_file()
    steps = [Step("teacher-features", ("teacher", "features"))] if perceptual else []
    steps += [Step("teacher-vae", ("teacher", "vae"), tuple(s.name for s in steps)),
              Step("teacher-unet", ("teacher", "unet"), ("teacher-vae",)),
              Step("teacher-decoder", ("teacher", "decoder"), ("teacher-vae",)),
              Step("teacher-export", ("teacher", "export"), ("teacher-unet", "teacher-decoder"))]
    evaluator = ()
    if classifier:
        steps.append(Step("classifier", ("classifier",)))
        evaluator = ("classifier",)
    steps.append(Step("benchmark-teacher", ("benchmark", "--groups", "floors,cfg,schedules"),
                      ("teacher-export", *evaluator)))
    students = [Step(distill_name(argv), ("distill", *argv), ("teacher-export",), distill_work(argv))
                for argv in DISTILL_COMMANDS]
    steps += students
    steps.append(Step("benchmark-students", ("benchmark", "--groups", "shortcut,students,goals,costs"),
                      ("benchmark-teacher", *(s.name for s in students)), alone=True))
    return steps


def set_aside_other_teacher(work: Path, digest: str) -> Path | None:
    """Move ``work`` aside if its ``settings.json`` records a run on a teacher of another ``digest``; returns
    where it went (None: nothing to move)."""
    from ..training.runner import SETTINGS_FILE, TEACHER_CONTENT

    settings = work / SETTINGS_FILE
    if not settings.is_file():
        return None
    try:
        recorded = json.loads(settings.read_text(encoding="utf-8")).get(TEACHER_CONTENT)
    except ValueError:
        recorded = None  # unreadable: the run itself says so, with the way out
    if recorded is None or recorded == digest:
        return None
    n = 1
    while (aside := work.with_name(f"{work.name}.other-teacher-{n}")).exists():
        n += 1
    work.rename(aside)
    return aside


def teacher_digest_now() -> str:
    """The digest the distill runner records for the lab teacher as it is now on disk."""
    from ..training.runner import teacher_digest
    from .sampling import load_teacher

    return teacher_digest(load_teacher())


def results_hold_another_teacher() -> bool:
    """Whether ``lab/results.json`` holds rows of a teacher other than the one on disk."""
    from .benchmark import RESULTS, Results, teacher_fingerprint

    if not RESULTS.is_file():
        return False
    held = Results.load(RESULTS).teacher
    return held is not None and held != teacher_fingerprint()


def prepare(step: Step) -> tuple[str, ...]:
    """What to run for ``step`` given the lab as it is now (the teacher done): a student's work folder on another
    teacher set aside, a results file of another teacher started anew."""
    if step.work is not None:
        aside = set_aside_other_teacher(step.work, teacher_digest_now())
        if aside is not None:
            print(f"  {step.name}: {step.work} held a run on another teacher; moved to {aside}", flush=True)
    if step.name == "benchmark-teacher" and results_hold_another_teacher():
        print("  benchmark-teacher: lab/results.json holds another teacher's rows; starting a new file (--fresh)",
              flush=True)
        return (*step.argv, "--fresh")
    return step.argv


def run(steps: list[Step], jobs: int, logs: Path = LOGS, python: str = sys.executable, prepare=prepare,
        poll: float = 1.0) -> list[str]:
    """Run ``steps`` (each once the steps it follows are done), at most ``jobs`` at a time, one thread each (a step
    marked ``alone`` once the others finished, by itself on ``jobs`` threads); returns the names of the steps that
    failed (then no new step starts, the running ones finish)."""
    names = [s.name for s in steps]
    for s in steps:
        if unknown := [a for a in s.after if a not in names]:
            raise ValueError(f"step {s.name} follows unknown step(s) {', '.join(unknown)}")
    logs.mkdir(parents=True, exist_ok=True)
    waiting, running, done, failed = list(steps), {}, set(), []
    by_name = {s.name: s for s in steps}
    began = time.perf_counter()
    try:
        while waiting or running:
            while not failed and len(running) < jobs and not any(by_name[n].alone for n in running):
                ready = next((s for s in waiting if all(a in done for a in s.after)), None)
                if ready is None or (ready.alone and running):
                    break
                waiting.remove(ready)
                threads = str(jobs if ready.alone else 1)
                env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
                argv = prepare(ready)
                log = (logs / f"{ready.name}.log").open("w")
                print(f"[{time.perf_counter() - began:7.0f} s] start  {ready.name}: python -m direct_distill "
                      f"{' '.join(argv)}", flush=True)
                running[ready.name] = (subprocess.Popen([python, "-m", "direct_distill", *argv], cwd=ROOT,
                                                        env=env, stdout=log, stderr=subprocess.STDOUT), log,
                                       time.perf_counter())
            if not running:
                if waiting and not failed:
                    raise ValueError(f"steps {', '.join(s.name for s in waiting)} wait on each other")
                break  # a failure stopped the rest
            time.sleep(poll)
            for name, (proc, log, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                minutes = (time.perf_counter() - start) / 60
                if proc.returncode == 0:
                    done.add(name)
                    print(f"[{time.perf_counter() - began:7.0f} s] done   {name} ({minutes:.1f} min)", flush=True)
                else:
                    failed.append(name)
                    print(f"[{time.perf_counter() - began:7.0f} s] FAILED {name} (exit {proc.returncode} after "
                          f"{minutes:.1f} min): see {logs / (name + '.log')}", flush=True)
    except KeyboardInterrupt:  # Ctrl-C at a terminal reaches the steps too; each saves as it stops
        for proc, log, _ in running.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # the rebuild alone was interrupted: pass it on
                proc.send_signal(signal.SIGINT)
                proc.wait()
            log.close()
        raise
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m direct_distill rebuild", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2,
                        help="steps run at once, one thread each (default 2; the last step, alone, takes them all)")
    parser.add_argument("--list", action="store_true", help="print the steps in order and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    steps = plan()
    if args.list:
        for s in steps:
            follows = f"   (after {', '.join(s.after)})" if s.after else ""
            print(f"{s.name:26s} python -m direct_distill {' '.join(s.argv)}{follows}")
        return 0
    try:
        failed = run(steps, args.jobs)
    except KeyboardInterrupt:
        parser.exit(130, f"\n{parser.prog}: stopped; run it again to resume every step from its last checkpoint\n")
    if failed:
        parser.exit(1, f"{parser.prog}: {', '.join(failed)} failed (logs in {LOGS}); fix it and run again: the "
                       "finished steps resume to no-ops\n")
    print(f"rebuilt: {TEACHER_DIR.parent} and lab/REPORT.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
