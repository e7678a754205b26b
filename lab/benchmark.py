"""Side-by-side measurement on the lab teacher: every configuration samples the same seeded noise and
labels, and is scored by the lab evaluator (FD to the real test set, class accuracy, seconds/image).

Results are merged into ``lab/results.json`` (typed rows: one per configuration and seed set), and
``lab/REPORT.md`` plus its plots are written from that file, so later row groups (shortcut, students)
add to the report without re-running earlier ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..schedulers import schedule_sigmas, sigma_table
from .data import CLASS_NAMES

LAB = Path(__file__).resolve().parent
RESULTS = LAB / "results.json"
REPORT = LAB / "REPORT.md"
PLOTS = LAB / "plots"
NFES = (4, 8, 12, 20, 50)
SEED_BASE = 1000


# --- what is measured ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A schedule of ``schedulers/`` with its settings; ``label`` names its rows in the results and the report."""

    name: str
    params: tuple[tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        return " ".join([self.name, *(f"{k}={v:g}" for k, v in self.params)])

    def sigmas(self, num_steps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        return schedule_sigmas(self.name, num_steps, sigma_table(alphas_cumprod), **dict(self.params))


def schedule(name: str, **params: float) -> Schedule:
    return Schedule(name, tuple(sorted(params.items())))


KARRAS = schedule("karras")
EXP_KARRAS = schedule("exp_karras", p=1.0)  # the project's default: the shortcut's and the students' schedule
EXP_KARRAS_P = (schedule("exp_karras", p=0.5), EXP_KARRAS, schedule("exp_karras", p=2.0))
SCHEDULES = (KARRAS, schedule("exponential"), schedule("normal"), *EXP_KARRAS_P)


@dataclass
class Run:
    """One configuration sampled on one seed set and scored."""

    group: str  # "cfg", "schedule", "shortcut" or "student"
    name: str
    nfe: int
    seed_set: int
    n: int
    fd: float
    accuracy: float
    seconds_per_image: float
    guidance: float | None = None
    teacher_steps: int | None = None  # shortcut: the steps of the run it hands off from
    method: str | None = None  # student: its method, file, and the file's sha256
    file: str | None = None
    sha256: str | None = None

    @property
    def key(self) -> tuple:
        return self.group, self.name, self.nfe, self.seed_set


@dataclass
class Floor:
    """A reference that involves no sampling: real images, or real images through the VAE."""

    name: str
    seed_set: int
    n: int
    fd: float
    accuracy: float | None = None

    @property
    def key(self) -> tuple:
        return self.name, self.seed_set


@dataclass
class Evaluation:
    step: int
    fd: float
    accuracy: float | None = None


@dataclass
class StudentFile:
    """What a committed student file records about its training."""

    name: str  # its report row (a progressive run's rounds share one)
    file: str
    method: str
    nfes: list[int]
    train_seconds: float | None
    threads: int | None
    device: str | None
    evaluations: list[Evaluation] = field(default_factory=list)
    backtracking: bool | None = None
    selected: Evaluation | None = None  # the step whose generator the file holds, if chosen by FD
    training: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.file


@dataclass
class TeacherCost:
    """The teacher's training cost on this machine, the reference for every distillation's seconds."""

    vae_seconds_per_step: float
    vae_steps: int
    vae_batch: int
    unet_seconds_per_step: float
    unet_steps: int
    unet_batch: int
    seconds: float
    threads: int


@dataclass
class Stats:
    """A configuration over its seed sets."""

    fd0: float  # seed set 0's FD (the same noise for every row), else the first
    fd: float  # mean over seed sets
    fd_sd: float | None  # standard deviation, where more than one seed set ran
    runs: int
    accuracy: float
    seconds_per_image: float


@dataclass
class Results:
    """Everything ``results.json`` holds, as typed rows."""

    runs: list[Run] = field(default_factory=list)
    floors: list[Floor] = field(default_factory=list)
    students: list[StudentFile] = field(default_factory=list)
    teacher_cost: TeacherCost | None = None
    best_guidance: float | None = None

    @classmethod
    def load(cls, path: Path = RESULTS) -> Results:
        return cls.from_json(json.loads(path.read_text())) if path.is_file() else cls()

    @classmethod
    def from_json(cls, data: dict) -> Results:
        def student(d):
            evaluations = [Evaluation(**e) for e in d.pop("evaluations", [])]
            selected = d.pop("selected", None)
            return StudentFile(**d, evaluations=evaluations, selected=Evaluation(**selected) if selected else None)

        cost = data.get("teacher_cost")
        return cls(runs=[Run(**r) for r in data.get("runs", [])], floors=[Floor(**f) for f in data.get("floors", [])],
                   students=[student(dict(s)) for s in data.get("student_files", [])],
                   teacher_cost=TeacherCost(**cost) if cost else None, best_guidance=data.get("best_guidance"))

    def to_json(self) -> dict:
        def row(item):
            return {k: v for k, v in dataclasses.asdict(item).items() if v is not None}

        return {"best_guidance": self.best_guidance,
                "teacher_cost": dataclasses.asdict(self.teacher_cost) if self.teacher_cost else None,
                "floors": [row(f) for f in sorted(self.floors, key=lambda f: f.key)],
                "runs": [row(r) for r in sorted(self.runs, key=lambda r: r.key)],
                "student_files": [dataclasses.asdict(s) for s in sorted(self.students, key=lambda s: s.key)]}

    def merge(self, other: Results) -> None:
        """Adds ``other``'s rows, replacing those of the same configuration and seed set."""
        for mine, theirs in ((self.runs, other.runs), (self.floors, other.floors), (self.students, other.students)):
            replaced = {item.key for item in theirs}
            mine[:] = [item for item in mine if item.key not in replaced] + list(theirs)
        self.teacher_cost = other.teacher_cost or self.teacher_cost
        self.best_guidance = other.best_guidance if other.best_guidance is not None else self.best_guidance

    def find(self, group: str, name: str, nfe: int) -> list[Run]:
        return [r for r in self.runs if (r.group, r.name, r.nfe) == (group, name, nfe)]

    def has(self, group: str, name: str, nfe: int, seed_set: int) -> Run | None:
        return next((r for r in self.find(group, name, nfe) if r.seed_set == seed_set), None)

    def stats(self, group: str, name: str, nfe: int) -> Stats | None:
        runs = self.find(group, name, nfe)
        if not runs:
            return None
        fds = [r.fd for r in runs]
        return Stats(fd0=next((r.fd for r in runs if r.seed_set == 0), fds[0]), fd=statistics.mean(fds),
                     fd_sd=statistics.stdev(fds) if len(fds) > 1 else None, runs=len(runs),
                     accuracy=statistics.mean(r.accuracy for r in runs),
                     seconds_per_image=statistics.mean(r.seconds_per_image for r in runs))

    def paired_difference(self, a: str, b: str, nfe: int, group_a: str = "schedule",
                          group_b: str = "schedule") -> tuple[float, float | None, int]:
        """Mean and sd of FD(a) - FD(b) over the seed sets both ran (the same seeds: a paired comparison)."""
        fa = {r.seed_set: r.fd for r in self.find(group_a, a, nfe)}
        fb = {r.seed_set: r.fd for r in self.find(group_b, b, nfe)}
        diffs = [fa[s] - fb[s] for s in sorted(set(fa) & set(fb))]
        if not diffs:
            return float("nan"), None, 0
        return statistics.mean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else None), len(diffs)

    def sample_count(self) -> int | None:
        return next((r.n for r in sorted(self.runs, key=lambda r: r.key)), None)


# --- sampling ------------------------------------------------------------------------------------


class Bench:
    """The lab teacher, the evaluator and the results file, for the row groups below."""

    def __init__(self, samples: int, results_path: Path = RESULTS, pipe=None, evaluator=None, plots: Path = PLOTS):
        from .evaluator import Evaluator
        from .sampling import load_teacher

        self.n = samples
        self.pipe = pipe if pipe is not None else load_teacher()
        self.evaluator = evaluator if evaluator is not None else Evaluator()
        self.path = results_path
        self.plots = plots
        self.results = Results.load(results_path)

    def record(self, group: str, name: str, nfe: int, seed_set: int, samples, **extra) -> Run:
        run = Run(group=group, name=name, nfe=nfe, seed_set=seed_set, n=len(samples.images),
                  fd=self.evaluator.fd(samples.images),
                  accuracy=self.evaluator.accuracy(samples.images, samples.labels),
                  seconds_per_image=samples.seconds_per_image, **extra)
        self.save(Results(runs=[run]))
        print(f"{group:10s} {name:22s} NFE {nfe:3d} seeds {seed_set}: FD {run.fd:.3f} "
              f"acc {run.accuracy:.3f} {run.seconds_per_image * 1e3:.1f} ms/img")
        if seed_set == 0:
            save_grid(samples.images, samples.labels, self.plots / f"grid_{slug(group, name, nfe)}.png")
        return run

    def save(self, new: Results) -> None:
        """Merges ``new`` into the results file under a lock, so row groups can run in parallel."""
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = Results.load(self.path)
            on_disk.merge(new)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(on_disk.to_json(), indent=1))
            tmp.replace(self.path)
            self.results = on_disk

    def teacher(self, sched: Schedule | str, sigmas: torch.Tensor, guidance: float, seed_set: int,
                group: str = "schedule") -> Run:
        from .sampling import sample_teacher

        name = sched.label if isinstance(sched, Schedule) else sched
        samples = sample_teacher(self.pipe, sigmas, guidance, self.n, SEED_BASE + seed_set,
                                 desc=f"{name} NFE {len(sigmas) - 1}")
        return self.record(group, name, len(sigmas) - 1, seed_set, samples, guidance=guidance)

    def teacher_at(self, sched: Schedule, nfe: int, guidance: float, seed_set: int) -> Run:
        """The teacher on ``sched`` at ``nfe``, sampled unless this seed set has it already."""
        return (self.results.has("schedule", sched.label, nfe, seed_set)
                or self.teacher(sched, sched.sigmas(nfe, self.pipe.scheduler.alphas_cumprod), guidance, seed_set))


def slug(*parts) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.+-]", "", "_".join(str(p) for p in parts).replace("|", "_"))


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 8):
    """Rows are classes, columns the first samples of each class."""
    import numpy as np
    from PIL import Image

    rows = []
    for c in range(len(CLASS_NAMES)):
        picked = images[labels == c][:per_class]
        rows.append(torch.cat(list(picked[:, 0]), dim=1))
    grid = ((torch.cat(rows, dim=0) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.kron(grid, np.ones((2, 2), dtype=np.uint8))).save(path)


def run_floors(bench: Bench, repeats: int):
    from .data import load_fashion_mnist
    from .sampling import decode

    floors = [Floor("real train vs test", s, bench.n, bench.evaluator.real_floor(bench.n, seed=s))
              for s in range(repeats)]
    x, y = load_fashion_mnist("train")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:bench.n]
    with torch.no_grad():
        vae = bench.pipe.vae
        lat = torch.cat([vae.encode(x[idx][i:i + 500]).latent_dist.mean for i in range(0, bench.n, 500)])
    rec = decode(bench.pipe, lat * vae.config.scaling_factor)
    floors.append(Floor("VAE reconstruction", 0, bench.n, bench.evaluator.fd(rec), bench.evaluator.accuracy(rec, y[idx])))
    bench.save(Results(floors=floors))


CFG_SWEEP_STEPS = 20


def cfg_label(guidance: float) -> str:
    return f"{KARRAS.label} cfg={guidance:g}"


def run_cfg_sweep(bench: Bench, guidances=(1.0, 1.5, 2.0, 3.0, 4.0)) -> float:
    """The teacher's best CFG (lowest FD) for DPM++ 2M Karras at CFG_SWEEP_STEPS steps."""
    sigmas = KARRAS.sigmas(CFG_SWEEP_STEPS, bench.pipe.scheduler.alphas_cumprod)
    runs = [bench.teacher(cfg_label(g), sigmas, g, 0, group="cfg") for g in guidances]
    best = min(runs, key=lambda r: r.fd).guidance
    bench.save(Results(best_guidance=best))
    return best


def run_schedules(bench: Bench, guidance: float, repeats: int, repeat_nfes=(8, 12, 20),
                  repeated=(KARRAS, EXP_KARRAS)):
    """Every schedule at every NFE on seed set 0; the key comparison on further seed sets for the spread."""
    for s in range(repeats):
        for sched in SCHEDULES:
            for nfe in NFES:
                if s == 0 or (nfe in repeat_nfes and sched in repeated):
                    bench.teacher(sched, sched.sigmas(nfe, bench.pipe.scheduler.alphas_cumprod), guidance, s)


# "K+1": K teacher steps of an N-step exp-Karras (p=1) run, then the shortcut. N puts step K inside the
# band the lab shortcut was trained on (steps 10-12 of 20, t ~ 259-352).
SHORTCUT_RUNS = {"7+1": (12, 7), "10+1": (20, 10), "12+1": (20, 12)}
SHORTCUT_TEACHER_NFES = (8, 11, 13, 20)


def run_shortcut_rows(bench: Bench, guidance: float, repeats: int):
    from ..models.shortcut_file import load_shortcut
    from ..pipelines import ShortcutCallback
    from . import SHORTCUT_PATH
    from .sampling import sample_teacher

    shortcut = load_shortcut(SHORTCUT_PATH)
    ac = bench.pipe.scheduler.alphas_cumprod
    for s in range(repeats):
        for nfe in SHORTCUT_TEACHER_NFES:
            bench.teacher_at(EXP_KARRAS, nfe, guidance, s)
        for name, (steps, k) in SHORTCUT_RUNS.items():
            samples = sample_teacher(bench.pipe, EXP_KARRAS.sigmas(steps, ac), guidance, bench.n, SEED_BASE + s,
                                     callback=ShortcutCallback(shortcut, handoff_step=k), desc=f"shortcut {name}")
            bench.record("shortcut", name, k + 1, s, samples, guidance=guidance, teacher_steps=steps)


STUDENT_NFES = (1, 2, 4, 8)
STUDENT_TEACHER_NFES = (1, 2, 4, 8, 20, 50)
ONE_STEP_START = "teacher: one call at t=999, guidance 1 (where gdd and disback start)"


def run_student_rows(bench: Bench, repeats: int):
    """Every committed student at each of its NFEs in STUDENT_NFES, at its recommended guidance."""
    from ..pipelines import load_student
    from . import STUDENTS_DIR
    from .sampling import load_teacher, sample_teacher

    guidance = bench.results.best_guidance or 2.0
    for s in range(repeats):
        for nfe in STUDENT_TEACHER_NFES:
            bench.teacher_at(EXP_KARRAS, nfe, guidance, s)
    for path in sorted(STUDENTS_DIR.glob("*.safetensors")):
        pipe = load_teacher()
        info = load_student(pipe, path)
        name = student_row_name(path)
        extra = info.extra
        selected = extra.get("selected")
        bench.save(Results(students=[StudentFile(
            name=name, file=path.name, method=info.method, nfes=sorted(info.nfe_schedules),
            train_seconds=extra.get("train_seconds"), threads=extra.get("threads"), device=extra.get("device"),
            evaluations=[Evaluation(step, **scores) for step, scores in extra.get("evaluations", [])],
            backtracking=extra.get("backtracking"), selected=Evaluation(**selected) if selected else None,
            training=extra.get("training", {}))]))
        digest = file_digest(path)
        for s in range(repeats):
            for nfe in sorted(set(info.nfe_schedules) & set(STUDENT_NFES)):
                done = bench.results.has("student", name, nfe, s)
                if done and done.sha256 == digest:
                    continue  # this very file was scored on these seeds already
                samples = sample_teacher(pipe, None, info.guidance, bench.n, SEED_BASE + s, steps=nfe,
                                         desc=f"{path.stem} NFE {nfe}")
                bench.record("student", name, nfe, s, samples, guidance=info.guidance, method=info.method,
                             file=path.name, sha256=digest)
        if info.method in ("gdd", "disback"):
            # Where every one-step student starts: the same single call with the LoRA off.
            pipe.disable_lora()
            for s in range(repeats):
                if bench.results.has("student", ONE_STEP_START, 1, s):
                    continue
                samples = sample_teacher(pipe, None, 1.0, bench.n, SEED_BASE + s, steps=1, desc=ONE_STEP_START)
                bench.record("student", ONE_STEP_START, 1, s, samples, guidance=1.0)


def file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def student_row_name(path: Path) -> str:
    """The report row of a student file: a progressive run's rounds (``progressive_nfe8``, ...) share one row."""
    import re

    return re.sub(r"_nfe\d+$", "", path.stem)


def measure_teacher_cost() -> TeacherCost:
    """The teacher's training cost, timed by lab.teacher on this machine (its two stages on short runs of the
    training code): the one place the benchmark calls the teacher's training."""
    from .teacher import measure_training_cost

    return TeacherCost(**measure_training_cost())


def run_costs(bench: Bench):
    cost = measure_teacher_cost()
    bench.save(Results(teacher_cost=cost))
    print(f"teacher training: VAE {cost.vae_seconds_per_step:.3f} s/step x {cost.vae_steps}, UNet "
          f"{cost.unet_seconds_per_step:.3f} s/step x {cost.unet_steps} = {cost.seconds / 60:.1f} min "
          f"on {cost.threads} thread(s)")


# --- the report ----------------------------------------------------------------------------------


def fmt_fd(st: Stats | None) -> str:
    """Seed set 0's FD (comparable across every row), then the mean ± sd where more seed sets ran."""
    if st is None:
        return "–"
    if st.fd_sd is not None:
        return f"{st.fd0:.3f} ({st.runs} sets: {st.fd:.3f} ± {st.fd_sd:.3f})"
    return f"{st.fd0:.3f}"


@contextlib.contextmanager
def figure(path: Path, xlabel: str, ylabel: str):
    """An Agg figure's axes; on exit: labels, grid, legend, saved to ``path`` and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_fd_vs_nfe(results: Results, names: list[str], path: Path, group: str = "schedule"):
    import matplotlib.ticker

    with figure(path, "NFE (DPM-Solver++ 2M steps)", "FD (classifier features, seed set 0) ↓") as ax:
        for name in names:
            pts = [(n, results.stats(group, name, n)) for n in NFES]
            pts = [(n, st.fd0) for n, st in pts if st]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(NFES, [str(n) for n in NFES])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_curves(runs: dict[str, list[Evaluation]], path: Path, start: float | None = None):
    with figure(path, "training step", "FD (1,000 samples) ↓") as ax:
        for name, evals in sorted(runs.items()):
            ax.plot([e.step for e in evals], [e.fd for e in evals], marker="o", label=name)
        if start is not None:
            ax.axhline(start, color="grey", linestyle="--", label="before training (teacher, one call at t=999)")


def header_section(results: Results) -> list[str]:
    return ["# Lab report", "",
            "Generated by `python -m direct_distill benchmark` from `lab/results.json`; do not edit by hand.",
            "", f"Teacher: `lab/assets/teacher` (class-conditional latent diffusion on Fashion-MNIST). "
            f"Every row samples the same {results.sample_count()} seeded initial latents and balanced labels "
            f"(100 per class); FD is the Fréchet distance to the 10,000 real test images in the lab "
            "classifier's 128-d feature space, accuracy is the classifier's agreement with the prompt. "
            "FD cells give seed set 0 (the same noise for every row); where more seed sets ran, their mean "
            "± standard deviation follows in brackets.", ""]


def floors_section(results: Results) -> list[str]:
    if not results.floors:
        return []
    real = [f.fd for f in results.floors if f.name == "real train vs test"]
    vae = next((f for f in results.floors if f.name == "VAE reconstruction"), None)
    lines = ["## Floors", "", "| reference | FD | accuracy |", "|---|---|---|"]
    if real:
        sd = f" ± {statistics.stdev(real):.2f}" if len(real) > 1 else ""
        lines.append(f"| {results.sample_count()} real training images | {statistics.mean(real):.2f}{sd} | – |")
    if vae:
        lines.append(f"| the same images through the VAE (encode, decode) | {vae.fd:.2f} | {vae.accuracy:.3f} |")
    return lines + [""]


def guidance_section(results: Results) -> list[str]:
    rows = sorted((r for r in results.runs if r.group == "cfg"), key=lambda r: r.guidance)
    if not rows:
        return []
    return ([f"## Guidance (DPM++ 2M Karras, {CFG_SWEEP_STEPS} steps)", "", "| guidance | FD | accuracy |",
             "|---|---|---|"]
            + [f"| {r.guidance:g} | {r.fd:.2f} | {r.accuracy:.3f} |" for r in rows]
            + ["", f"Best guidance (lowest FD): **{results.best_guidance:g}**, used for every row below.", ""])


def teacher_quality_section(results: Results) -> list[str]:
    teacher50 = results.stats("schedule", KARRAS.label, 50)
    if not teacher50:
        return []
    real = [f.fd for f in results.floors if f.name == "real train vs test"]
    floor_txt = f" (real-data floor {statistics.mean(real):.2f})" if real else ""
    return ["## Teacher quality", "",
            f"DPM++ 2M Karras, 50 steps, guidance {results.best_guidance:g}, {results.sample_count()} samples: FD "
            f"**{teacher50.fd:.2f}**{floor_txt}, class accuracy **{teacher50.accuracy:.3f}**.", ""]


def schedules_section(results: Results, plots: Path) -> list[str]:
    if not any(r.group == "schedule" for r in results.runs):
        return []
    names = [s.label for s in SCHEDULES]
    columns = ["| schedule | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---|" * len(NFES)]
    lines = ["## Schedules (DPM++ 2M)", "", "FD (lower is better):", "", *columns]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(fmt_fd(results.stats("schedule", name, k)) for k in NFES) + " |")
    lines += ["", "Class accuracy:", "", *columns]
    for name in names:
        cells = [results.stats("schedule", name, k) for k in NFES]
        lines.append(f"| {name} | " + " | ".join(f"{c.accuracy:.3f}" if c else "–" for c in cells) + " |")
    # The cost depends on the NFE only; the karras rows stand for every schedule.
    cells = [results.stats("schedule", KARRAS.label, k) for k in NFES]
    lines += ["", "Seconds per image (CPU, batch 500, CFG doubles the batch):", "", *columns,
              "| any schedule | " + " | ".join(f"{c.seconds_per_image * 1e3:.1f} ms" if c else "–" for c in cells)
              + " |", "", "![FD vs NFE](plots/fd_vs_nfe.png)", ""]
    plot_fd_vs_nfe(results, names, plots / "fd_vs_nfe.png")
    return lines + exp_karras_verdict_section(results)


def verdict(mean: float, sd: float | None, k: int, better: str, worse: str) -> str:
    """Which side a paired FD difference (``better`` minus ``worse``) favours: significant when its mean exceeds
    twice its standard error."""
    if sd is None:
        return f"{better} better (one seed set)" if mean < 0 else f"{worse} better (one seed set)"
    if abs(mean) > 2 * sd / k ** 0.5:
        return f"{better} better" if mean < 0 else f"{worse} better"
    return "no significant difference"


def exp_karras_verdict_section(results: Results) -> list[str]:
    lines = ["### Does exp_karras beat karras?", "",
             f"Paired over the same seed sets: FD({EXP_KARRAS.label}) − FD({KARRAS.label}); negative means exp_karras "
             "is better.", "", "| NFE | difference | seed sets | verdict |", "|---|---|---|---|"]
    for nfe in NFES:
        mean, sd, k = results.paired_difference(EXP_KARRAS.label, KARRAS.label, nfe)
        if k == 0:
            continue
        sd_txt = f" ± {sd:.3f}" if sd is not None else ""
        lines.append(f"| {nfe} | {mean:+.3f}{sd_txt} | {k} | {verdict(mean, sd, k, 'exp_karras', 'karras')} |")
    best = {}
    for nfe in NFES:
        candidates = [(st.fd, s) for s in EXP_KARRAS_P if (st := results.stats("schedule", s.label, nfe))]
        if candidates:
            best[nfe] = min(candidates, key=lambda c: c[0])[1]
    if best:
        lines += ["", "Best exp_karras p per NFE: " + ", ".join(
            f"NFE {k}: p={dict(s.params)['p']:g}" for k, s in best.items()) + "."]
    return lines + [""]


def shortcut_section(results: Results) -> list[str]:
    rows = [(name, results.stats("shortcut", name, k + 1)) for name, (_, k) in SHORTCUT_RUNS.items()]
    if not any(st for _, st in rows):
        return []
    from ..models.io import read_safetensors
    from . import SHORTCUT_PATH

    lines = ["## The NAFNet shortcut (K teacher steps + 1 shortcut call)", ""]
    if SHORTCUT_PATH.is_file():
        psnr = json.loads(read_safetensors(SHORTCUT_PATH)[1].get("extra", "{}")).get("heldout_psnr", {})
        if psnr:
            lines += ["Held-out PSNR against the 20-step teacher's final latent (latent space, peak = the range "
                      "of the held-out targets; `input` is x_t itself):", "", "| held-out pairs | " +
                      " | ".join(k for k in psnr) + " |", "|---|" + "---|" * len(psnr)]
            for key in sorted({t for v in psnr.values() for t in v}):
                lines.append(f"| {key} | " + " | ".join(f"{v.get(key, float('nan')):.2f} dB" for v in psnr.values())
                             + " |")
            lines.append("")
    lines += ["| run | NFE | FD | accuracy | teacher exp_karras at the same NFE: FD | accuracy |",
              "|---|---|---|---|---|---|"]
    for name, st in rows:
        if not st:
            continue
        nfe = SHORTCUT_RUNS[name][1] + 1
        ref = results.stats("schedule", EXP_KARRAS.label, nfe)
        ref_cells = f"{fmt_fd(ref)} | {ref.accuracy:.3f}" if ref else "– | –"
        lines.append(f"| {name} | {nfe} | {fmt_fd(st)} | {st.accuracy:.3f} | {ref_cells} |")
    ref20 = results.stats("schedule", EXP_KARRAS.label, 20)
    if ref20:
        lines.append(f"| teacher, 20 steps | 20 | {fmt_fd(ref20)} | {ref20.accuracy:.3f} | | |")
        twelve = results.stats("shortcut", "12+1", 13)
        if twelve:
            lines += ["", f"12+1 FD is {100 * (twelve.fd / ref20.fd - 1):+.1f} % against the teacher's "
                      "20-step FD (goal: within 5 %)."]
        seven, eight = results.stats("shortcut", "7+1", 8), results.stats("schedule", EXP_KARRAS.label, 8)
        if seven and eight:
            lines.append(f"7+1 FD {seven.fd:.2f} against the teacher's 8-step {eight.fd:.2f} "
                         f"({'better' if seven.fd < eight.fd else 'worse'}; goal: better).")
    return lines + [""]


def student_section(results: Results) -> list[str]:
    names = sorted({r.name for r in results.runs if r.group == "student"})
    if not names:
        return []
    cols = sorted(set(STUDENT_NFES) | {20, 50})
    lines = ["## LoRA students (FD / class accuracy)", "",
             "| model | " + " | ".join(f"NFE {k}" for k in cols) + " |", "|---|" + "---|" * len(cols)]

    def cell(st):
        return f"{fmt_fd(st)} / {st.accuracy:.3f}" if st else "–"

    for name in names:
        label = name if name == ONE_STEP_START else f"student `{name}`"
        lines.append(f"| {label} | " + " | ".join(cell(results.stats("student", name, k)) for k in cols) + " |")
    lines.append("| teacher, exp_karras DPM++ 2M | " +
                 " | ".join(cell(results.stats("schedule", EXP_KARRAS.label, k)) for k in cols) + " |")
    ref20 = results.stats("schedule", EXP_KARRAS.label, 20)
    if ref20:
        lines += ["", f"Against the teacher's 20-NFE FD ({ref20.fd:.3f}); the goals are within 25 % at NFE 2 and "
                  "within 10 % at NFE 4:", ""]
        for name in (n for n in names if n != ONE_STEP_START):
            for k, goal in ((2, 25), (4, 10)):
                st = results.stats("student", name, k)
                if st:
                    gap = 100 * (st.fd / ref20.fd - 1)
                    lines.append(f"- `{name}` at NFE {k}: {gap:+.0f} % ({'met' if gap <= goal else 'missed'})")
    return lines + [""]


def cost_section(results: Results) -> list[str]:
    """Each student file's recorded training seconds next to the teacher's training cost."""
    files = sorted(results.students, key=lambda s: s.file)
    teacher = results.teacher_cost
    if not files:
        return []
    lines = ["## What distillation costs", "",
             "Seconds in the training loop, recorded in each student file (CPU, one thread unless noted). "
             + (f"The teacher's training, timed on this machine with the same code: VAE "
                f"{teacher.vae_seconds_per_step:.3f} s/step x {teacher.vae_steps} + UNet "
                f"{teacher.unet_seconds_per_step:.3f} s/step x {teacher.unet_steps} (batch "
                f"{teacher.unet_batch}) = **{teacher.seconds / 60:.1f} min** on {teacher.threads} thread(s)."
                if teacher else "The teacher's cost is not measured yet (`--groups costs`)."), "",
             "| student file | NFE | training | share of the teacher's training |", "|---|---|---|---|"]
    for f in files:
        sec = f.train_seconds
        share = f"{100 * sec / teacher.seconds:.0f} %" if sec is not None and teacher else "–"
        threads = f" ({f.threads} threads)" if f.threads not in (None, 1) else ""
        lines.append(f"| `{f.file}` | {', '.join(map(str, f.nfes))} | "
                     f"{f'{sec / 60:.1f} min' if sec is not None else 'not recorded'}{threads} | {share} |")
    return lines + [""]


def curve_section(results: Results, plots: Path) -> list[str]:
    """FD along training of the students that were evaluated as they trained; for runs of one method (DisBack
    with and without backtracking), the steps each needs to reach the best FD the slower of them reached."""
    files = {f.name: f for f in results.students if f.evaluations}
    if not files:
        return []
    runs = {name: f.evaluations for name, f in files.items()}
    start = results.stats("student", ONE_STEP_START, 1)
    plot_curves(runs, plots / "one_step_curves.png", start=start.fd0 if start else None)
    lines = ["## One-step students along training", "",
             "FD of 1,000 samples of the student at regular steps (its own seeds, guidance 1). DisBack's steps are "
             "those of stage two; with backtracking, stage one (the degradation path) comes before them. The last "
             "column is the step whose generator the student file holds (the lowest-FD one for runs made since "
             "the training keeps it, the last one before).", "",
             "![FD along training](plots/one_step_curves.png)", "",
             "| run | first FD (step) | best FD (step) | last FD (step) | file holds step |", "|---|---|---|---|---|"]
    for name, evals in sorted(runs.items()):
        best = min(evals, key=lambda e: e.fd)
        held = files[name].selected.step if files[name].selected else evals[-1].step
        lines.append(f"| `{name}` | {evals[0].fd:.2f} ({evals[0].step}) | {best.fd:.2f} ({best.step}) | "
                     f"{evals[-1].fd:.2f} ({evals[-1].step}) | {held} |")
    by_method: dict[str, list[str]] = {}
    for name, f in files.items():
        by_method.setdefault(f.method, []).append(name)
    for method, names in sorted(by_method.items()):
        if len(names) < 2:
            continue
        target = max(min(e.fd for e in runs[n]) for n in names)
        lines += ["", f"`{method}`: steps to reach FD {target:.2f} (the higher of the runs' best FDs):", "",
                  "| run | steps |", "|---|---|"]
        for name in sorted(names):
            reached = next((e.step for e in runs[name] if e.fd <= target), None)
            lines.append(f"| `{name}` | {reached if reached is not None else 'not reached'} |")
    return lines + [""]


def write_report(results: Results, path: Path = REPORT) -> str:
    """Writes the report (and its plots, beside it in ``plots/``) from ``results``; returns its text."""
    plots = path.parent / "plots"
    students = student_section(results)
    lines = (header_section(results) + floors_section(results) + guidance_section(results)
             + teacher_quality_section(results) + schedules_section(results, plots) + shortcut_section(results)
             + students + (cost_section(results) + curve_section(results, plots) if students else []))
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m direct_distill benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="floors,cfg,schedules",
                        help="comma-separated row groups to (re)run: floors, cfg, schedules, shortcut, students, costs")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="seed sets for the spread at NFE 8, 12, 20")
    parser.add_argument("--guidance", type=float, default=None, help="skip the sweep and use this CFG")
    parser.add_argument("--report-only", action="store_true", help="rewrite REPORT.md from results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        print(write_report(Results.load()))
        return
    torch.manual_seed(0)
    bench = Bench(args.samples)
    groups = set(args.groups.split(","))
    if "floors" in groups:
        run_floors(bench, args.repeats)
    guidance = args.guidance or bench.results.best_guidance
    if "cfg" in groups:
        guidance = run_cfg_sweep(bench)
    if "schedules" in groups:
        run_schedules(bench, guidance or 2.0, args.repeats)
    if "shortcut" in groups:
        run_shortcut_rows(bench, guidance or 2.0, args.repeats)
    if "students" in groups:
        run_student_rows(bench, args.repeats)
    if "costs" in groups:
        run_costs(bench)
    write_report(bench.results)
    print(f"report written to {REPORT}")


if __name__ == "__main__":
    main()
