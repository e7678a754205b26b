"""Side-by-side measurement on the lab teacher: every configuration samples the same seeded noise and
labels, and is scored by the lab evaluator (FD to the real test set, class accuracy, seconds/image).

Results are merged into ``lab/results.json`` (typed rows: one per configuration and seed set), and
``lab/REPORT.md`` plus its plots are written from that file, so later row groups (shortcut, students)
add to the report without re-running earlier ones.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import statistics
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.io import atomic_write_text, files_sha256
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
# The schedules ComfyUI users pick instead, at ComfyUI's settings; polyexponential at its default rho = 1 is
# the exponential schedule, so its row takes rho = 2 (finer steps near sigma_min).
PEER_SCHEDULES = (schedule("align_your_steps"), schedule("gits"), schedule("kl_optimal"), schedule("beta"),
                  schedule("polyexponential", rho=2.0), schedule("simple"), schedule("sgm_uniform"))
PEER_SETTINGS = ("align_your_steps: the published SD1 noise levels, log-linearly interpolated; gits: the published "
                 "SD1.5 table at coefficient 1.20; beta: alpha = beta = 0.6; polyexponential: rho = 2 (at ComfyUI's "
                 "default rho = 1 it is the exponential row)")
SCHEDULES = (KARRAS, schedule("exponential"), schedule("normal"), *EXP_KARRAS_P, *PEER_SCHEDULES)
GRID_NFES = (4, 8, 12, 20)  # every schedule on every seed set
LAST_NFE_SCHEDULES = (KARRAS, EXP_KARRAS)  # NFE 50 (the teacher's quality) on seed set 0: the rest add no verdict


@dataclass(frozen=True)
class Config:
    """What a row measures: one configuration, sampled on as many seed sets as ran."""

    group: str  # "cfg", "schedule", "shortcut" or "student"
    name: str
    nfe: int


def teacher_on(sched: Schedule | str, nfe: int) -> Config:
    return Config("schedule", sched.label if isinstance(sched, Schedule) else sched, nfe)


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
    teacher_steps: int | None = None  # shortcut: the steps of the run it hands off from, and its schedule
    schedule: str | None = None
    method: str | None = None  # student: its method, file, and the file's sha256
    file: str | None = None
    sha256: str | None = None

    @property
    def config(self) -> Config:
        return Config(self.group, self.name, self.nfe)

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
    decoder_seconds_per_step: float = 0.0  # the decoder's fine-tuning (batch vae_batch); 0 steps: no such stage
    decoder_steps: int = 0
    features_seconds_per_step: float = 0.0  # the feature network of a perceptual term; 0 steps: no such stage
    features_steps: int = 0


@dataclass
class Stats:
    """A configuration over its seed sets."""

    fd0: float | None  # seed set 0's FD (the same noise for every row); None where set 0 did not run
    fd: float  # mean over seed sets
    fd_sd: float | None  # standard deviation, where more than one seed set ran
    runs: int
    accuracy: float
    seconds_per_image: float


@dataclass
class Paired:
    """FD(a) - FD(b) over the seed sets both ran: the same noise, so a paired comparison."""

    mean: float
    sd: float | None  # None for a single seed set
    k: int
    fd_a: float  # each side's mean over those seed sets
    fd_b: float

    @property
    def gap_percent(self) -> float:
        return 100 * (self.fd_a / self.fd_b - 1)

    @property
    def half_width(self) -> float | None:
        """Half the width of the mean difference's two-sided 95 % confidence interval (Student's t on k - 1
        degrees of freedom: 4.30 standard errors for 3 seed sets); None for a single seed set."""
        if self.sd is None:
            return None
        from scipy.stats import t

        return float(t.ppf(0.975, self.k - 1)) * self.sd / self.k ** 0.5

    @property
    def significant(self) -> bool:
        """The 95 % confidence interval of the mean difference excludes zero."""
        return self.half_width is not None and abs(self.mean) > self.half_width

    def upper_gap_percent(self) -> float | None:
        """FD(a) above FD(b) in percent at the upper end of the 95 % interval: what a "within X %" goal must
        clear to be shown."""
        return None if self.sd is None else 100 * (self.mean + self.half_width) / self.fd_b

    def describe(self) -> str:
        spread = f" ± {self.sd:.3f}" if self.sd is not None else ""
        return f"{self.mean:+.3f}{spread} over {sets(self.k)}{', significant' if self.significant else ''}"

    def verdict(self, a: str, b: str) -> str:
        """Which side the difference favours, ``a`` being the first term."""
        winner = a if self.mean < 0 else b
        if self.sd is None:
            return f"{winner} lower on one seed set, no spread to judge by"
        return f"{winner} better" if self.significant else "no significant difference"


def paired_over(diffs: list[float], a: list[float], b: list[float]) -> Paired:
    """Per-seed-set differences (FD(a) - FD(b), or a goal's margin on each set) as a Paired, with each side's
    mean over the same sets."""
    return Paired(statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else None, len(diffs),
                  statistics.mean(a), statistics.mean(b))


@dataclass
class Ranking:
    """The teacher's schedules at one NFE, by mean FD over the seed sets every one of them ran."""

    nfe: int
    seed_sets: list[int]
    fds: dict[str, float]  # schedule label -> mean FD over ``seed_sets``
    best_vs_runner_up: Paired | None  # None where a single schedule ran

    @property
    def order(self) -> list[str]:
        return sorted(self.fds, key=self.fds.get)

    @property
    def best(self) -> str:
        return self.order[0]


NOT_SHOWN = "not shown"


@dataclass
class Goal:
    """One goal of the issue the lab answers, with what was measured against it."""

    topic: str
    goal: str
    measured: str
    met: bool | str | None  # None: not measured yet; NOT_SHOWN: met on the mean, not beyond the seed sets' noise

    @property
    def status(self) -> str:
        return {True: "**met**", False: "**missed**", None: "not measured", NOT_SHOWN: "**not shown**"}[self.met]


class ResultsFileError(ValueError):
    """A results file that cannot be read or extended as asked: one line for the command to print."""


@dataclass
class Results:
    """Everything ``results.json`` holds, as typed rows, and the comparisons the report draws from them."""

    runs: list[Run] = field(default_factory=list)
    floors: list[Floor] = field(default_factory=list)
    students: list[StudentFile] = field(default_factory=list)
    teacher_cost: TeacherCost | None = None
    best_guidance: float | None = None
    teacher: str | None = None  # sha256 of the teacher's weights: rows of two teachers never mix

    @classmethod
    def load(cls, path: Path = RESULTS) -> Results:
        """The rows of ``path`` (none if there is no such file); :class:`ResultsFileError` if it cannot be read."""
        if not path.is_file():
            return cls()
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError, AttributeError) as err:  # JSONDecodeError is a ValueError
            raise ResultsFileError(f"{path}: not a results file this benchmark reads ({type(err).__name__}: "
                                   f"{err}); restore it (git checkout) or start a new one with --fresh") from None

    @classmethod
    def from_json(cls, data: dict) -> Results:
        for row in data.get("runs", []) + data.get("floors", []):
            if not math.isfinite(row["fd"]):
                raise ValueError(f"row {row.get('group', 'floor')} {row['name']!r} seed set {row['seed_set']} "
                                 f"has FD {row['fd']}")
        def student(d):
            evaluations = [Evaluation(**e) for e in d.pop("evaluations", [])]
            selected = d.pop("selected", None)
            return StudentFile(**d, evaluations=evaluations, selected=Evaluation(**selected) if selected else None)

        cost = data.get("teacher_cost")
        return cls(runs=[Run(**r) for r in data.get("runs", [])], floors=[Floor(**f) for f in data.get("floors", [])],
                   students=[student(dict(s)) for s in data.get("student_files", [])],
                   teacher_cost=TeacherCost(**cost) if cost else None, best_guidance=data.get("best_guidance"),
                   teacher=data.get("teacher"))

    def to_json(self) -> dict:
        def row(item):
            return {k: v for k, v in dataclasses.asdict(item).items() if v is not None}

        return {"teacher": self.teacher, "best_guidance": self.best_guidance,
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
        self.teacher = other.teacher or self.teacher

    def fds(self, config: Config) -> dict[int, float]:
        """FD per seed set."""
        return {r.seed_set: r.fd for r in self.runs if r.config == config}

    def has(self, config: Config, seed_set: int) -> Run | None:
        return next((r for r in self.runs if r.config == config and r.seed_set == seed_set), None)

    def stats(self, config: Config) -> Stats | None:
        runs = [r for r in self.runs if r.config == config]
        if not runs:
            return None
        fds = [r.fd for r in runs]
        return Stats(fd0=next((r.fd for r in runs if r.seed_set == 0), None), fd=statistics.mean(fds),
                     fd_sd=statistics.stdev(fds) if len(fds) > 1 else None, runs=len(runs),
                     accuracy=statistics.mean(r.accuracy for r in runs),
                     seconds_per_image=statistics.mean(r.seconds_per_image for r in runs))

    def paired(self, a: Config, b: Config, seed_sets=None) -> Paired | None:
        """FD(a) - FD(b) over the seed sets both ran (or those of ``seed_sets`` among them)."""
        fa, fb = self.fds(a), self.fds(b)
        common = sorted(set(fa) & set(fb) & (set(seed_sets) if seed_sets is not None else set(fa)))
        if not common:
            return None
        return paired_over([fa[s] - fb[s] for s in common], [fa[s] for s in common], [fb[s] for s in common])

    def ranking(self, nfe: int) -> Ranking | None:
        """The teacher's schedules at ``nfe`` ranked on the seed sets all of them ran."""
        by_schedule = {r.name: self.fds(r.config) for r in self.runs if r.group == "schedule" and r.nfe == nfe}
        if not by_schedule:
            return None
        common = sorted(set.intersection(*(set(f) for f in by_schedule.values())))
        if not common:
            return None
        fds = {name: statistics.mean(f[s] for s in common) for name, f in by_schedule.items()}
        order = sorted(fds, key=fds.get)
        runner_up = (self.paired(teacher_on(order[0], nfe), teacher_on(order[1], nfe), common) if len(order) > 1
                     else None)
        return Ranking(nfe, common, fds, runner_up)

    def teacher_best(self, nfe: int) -> Config | None:
        """The teacher's best schedule at ``nfe``: the reference for the shortcut and the students."""
        ranking = self.ranking(nfe)
        return teacher_on(ranking.best, nfe) if ranking else None

    def sample_count(self) -> int | None:
        return next((r.n for r in sorted(self.runs, key=lambda r: r.key)), None)


# --- sampling ---------------------------------------------------------------------------------------


def teacher_fingerprint(folder: Path | None = None) -> str:
    """sha256 over the teacher folder's weight files: which teacher a results file measured."""
    from . import TEACHER_DIR

    return files_sha256(*sorted((folder or TEACHER_DIR).rglob("*.safetensors")))


class Bench:
    """The lab teacher, the evaluator and the results file, for the row groups below.

    A results file holds the rows of one teacher; ``fresh`` starts a new one (say, for a retrained teacher)."""

    def __init__(self, samples: int, results_path: Path = RESULTS, fresh: bool = False, pipe=None, evaluator=None,
                 teacher_id: str | None = None, plots: Path = PLOTS):
        from .evaluator import Evaluator
        from .sampling import load_teacher

        self.n = samples
        self.pipe = pipe if pipe is not None else load_teacher()
        self.teacher_id = teacher_id or teacher_fingerprint()
        self.evaluator = evaluator if evaluator is not None else Evaluator()
        self.path = results_path
        self.plots = plots
        if fresh:  # the old file is not read: it may be what --fresh is for
            self._update(lambda new: setattr(new, "teacher", self.teacher_id), read=False)
            return
        self.results = Results.load(results_path)
        if self.results.teacher not in (None, self.teacher_id):
            raise ResultsFileError(f"{results_path} holds rows measured on another teacher (weights sha256 "
                                   f"{self.results.teacher[:12]}..., this one is {self.teacher_id[:12]}...): start "
                                   "a new file with --fresh (git keeps the old one)")
        held = self.results.sample_count()
        if held not in (None, samples):
            raise ResultsFileError(f"{results_path} holds rows of {held} samples; rows of {samples} would be compared "
                                   f"with them and replace them: run with --samples {held}, or start a new file with "
                                   "--fresh (git keeps the old one)")

    def record(self, group: str, name: str, nfe: int, seed_set: int, samples, **extra) -> Run:
        bad = int((~torch.isfinite(samples.images.flatten(1))).any(1).sum())
        if bad:
            raise ResultsFileError(f"{group} {name} NFE {nfe} seed set {seed_set}: {bad} of {len(samples.images)} "
                                   "samples hold non-finite values (the sampler diverged); no row was recorded")
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

    def discard(self, stale, stale_file=None) -> None:
        """Drops the rows for which ``stale(run)`` holds (those of a file that is no longer committed), and their
        sample grids; with ``stale_file``, the student files for which it holds."""
        dropped = []

        def drop(on_disk: Results) -> None:
            dropped.extend(r for r in on_disk.runs if stale(r))
            on_disk.runs = [r for r in on_disk.runs if not stale(r)]
            if stale_file is not None:
                on_disk.students = [f for f in on_disk.students if not stale_file(f)]

        self._update(drop)
        for run in dropped:
            if run.seed_set == 0:
                (self.plots / f"grid_{slug(run.group, run.name, run.nfe)}.png").unlink(missing_ok=True)

    def save(self, new: Results) -> None:
        """Merges ``new`` into the results file, so row groups can run in parallel."""

        def merge(on_disk: Results) -> None:
            on_disk.merge(new)
            on_disk.teacher = self.teacher_id

        self._update(merge)

    def _update(self, change, read: bool = True) -> None:
        """``change(results)`` applied to the results file as it is on disk (an empty one without ``read``), under
        a lock, and written back atomically."""
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = Results.load(self.path) if read else Results()
            change(on_disk)
            atomic_write_text(self.path, json.dumps(on_disk.to_json(), indent=1))
            self.results = on_disk

    def sample(self, name: str, sigmas: torch.Tensor, guidance: float, seed_set: int,
               group: str = "schedule") -> Run:
        from .sampling import sample_teacher

        samples = sample_teacher(self.pipe, sigmas, guidance, self.n, SEED_BASE + seed_set,
                                 desc=f"{name} NFE {len(sigmas) - 1}")
        return self.record(group, name, len(sigmas) - 1, seed_set, samples, guidance=guidance)

    def schedule(self, sched: Schedule, nfe: int, guidance: float, seed_set: int) -> Run:
        return self.sample(sched.label, sched.sigmas(nfe, self.pipe.scheduler.alphas_cumprod), guidance, seed_set)

    def schedule_once(self, sched: Schedule, nfe: int, guidance: float, seed_set: int) -> Run:
        """The teacher on ``sched`` at ``nfe``, sampled unless this seed set has it already at this guidance. Rows
        of this configuration at another guidance are dropped first: a row's seed sets are at one guidance."""
        config = teacher_on(sched, nfe)
        held = self.results.has(config, seed_set)
        if held is not None and held.guidance == guidance:
            return held
        other = lambda r: r.config == config and r.guidance != guidance  # noqa: E731
        if any(map(other, self.results.runs)):  # the file is rewritten only when there is something to drop
            self.discard(other)
        return self.schedule(sched, nfe, guidance, seed_set)


def slug(*parts) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.+-]", "", "_".join(str(p) for p in parts).replace("|", "_"))


GRID_SCALE = 2  # each 32x32 sample drawn at 64x64
LABEL_WIDTH, TITLE_HEIGHT = 96, 20  # a labelled sheet's column of class names and its title line, in pixels


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 8,
              title: str | None = None):
    """Rows are classes, columns the first samples of each class. With ``title``, a labelled sheet: the title
    above, each row's class name on its left."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rows = []
    for c in range(len(CLASS_NAMES)):
        picked = images[labels == c][:per_class]
        rows.append(torch.cat(list(picked[:, 0]), dim=1))
    grid = ((torch.cat(rows, dim=0) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    sheet = Image.fromarray(np.kron(grid, np.ones((GRID_SCALE, GRID_SCALE), dtype=np.uint8)))
    if title is not None:
        cell = 32 * GRID_SCALE
        labelled = Image.new("L", (sheet.width + LABEL_WIDTH, sheet.height + TITLE_HEIGHT), 255)
        labelled.paste(sheet, (LABEL_WIDTH, TITLE_HEIGHT))
        draw, font = ImageDraw.Draw(labelled), ImageFont.load_default()
        draw.text((4, 4), title, fill=0, font=font)
        for c, name in enumerate(CLASS_NAMES):
            draw.text((4, TITLE_HEIGHT + c * cell + cell // 2 - 6), name, fill=0, font=font)
        sheet = labelled
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


REAL_FLOOR, VAE_FLOOR = "real train vs test", "VAE reconstruction"


@torch.no_grad()
def run_floors(bench: Bench, seed_sets: Iterable[int]):
    """Per seed set: ``n`` real training images (the floor any sampler can reach at that n) and the same images
    through the VAE (the floor of any latent sampler), FD and class accuracy of both."""
    from .evaluator import floor_images
    from .sampling import decode

    vae = bench.pipe.vae
    floors = []
    for s in seed_sets:
        real, labels = floor_images(bench.n, s)
        latents = torch.cat([vae.encode(real[i:i + 500]).latent_dist.mean for i in range(0, bench.n, 500)])
        round_trip = decode(bench.pipe, latents * vae.config.scaling_factor)
        floors += [Floor(REAL_FLOOR, s, bench.n, bench.evaluator.fd(real), bench.evaluator.accuracy(real, labels)),
                   Floor(VAE_FLOOR, s, bench.n, bench.evaluator.fd(round_trip),
                         bench.evaluator.accuracy(round_trip, labels))]
    bench.save(Results(floors=floors))


CFG_SWEEP_STEPS = 20


def cfg_label(guidance: float) -> str:
    return f"{KARRAS.label} cfg={guidance:g}"


def run_cfg_sweep(bench: Bench, guidances=(1.0, 1.5, 2.0, 3.0, 4.0)) -> float:
    """The teacher's best CFG (lowest FD) for DPM++ 2M Karras at CFG_SWEEP_STEPS steps."""
    sigmas = KARRAS.sigmas(CFG_SWEEP_STEPS, bench.pipe.scheduler.alphas_cumprod)
    runs = [bench.sample(cfg_label(g), sigmas, g, 0, group="cfg") for g in guidances]
    best = min(runs, key=lambda r: r.fd).guidance
    bench.save(Results(best_guidance=best))
    return best


def run_schedules(bench: Bench, guidance: float, repeats: int, schedules=SCHEDULES, grid_nfes=GRID_NFES,
                  last_nfe: int = NFES[-1], last_schedules=LAST_NFE_SCHEDULES):
    """Every schedule at every grid NFE on every seed set (the paired comparisons), and those of
    ``last_schedules`` at ``last_nfe`` on seed set 0; a row the results file holds at this guidance is kept, so an
    interrupted run continues and processes can share the group (``--schedules``)."""
    for s in range(repeats):
        for sched in schedules:
            for nfe in (*grid_nfes, last_nfe) if s == 0 and sched in last_schedules else grid_nfes:
                bench.schedule_once(sched, nfe, guidance, s)


@dataclass(frozen=True)
class ShortcutRun:
    """K teacher steps of an N-step run on ``schedule``, then the shortcut: K + 1 UNet-sized calls. ``trained``:
    a hand-off the shortcut learnt (its schedule, a run length it was trained on); else the same hand-off from a
    run of another schedule. ``tag`` tells apart two trained hand-offs at the same K."""

    schedule: Schedule
    steps: int  # N
    handoff: int  # K
    trained: bool = True
    tag: bool = False

    @property
    def name(self) -> str:
        base = f"{self.handoff}+1"
        if not self.trained:
            return f"{base}, {self.schedule.label} {self.steps} steps"
        return f"{base} ({self.steps} steps)" if self.tag else base

    @property
    def config(self) -> Config:
        return Config("shortcut", self.name, self.handoff + 1)

    @property
    def finishes(self) -> Config:
        """The teacher's whole N-step run from the same noise: the end the shortcut was trained to reach (for runs
        of the schedule it was trained on)."""
        return teacher_on(self.schedule, self.steps)


def schedule_of(label: str) -> Schedule:
    """The schedule a row label names (``"exp_karras p=1"``, ``"beta"``)."""
    name, *params = label.split()
    return schedule(name, **{k: float(v) for k, v in (param.split("=", 1) for param in params)})


# Hand-offs from runs of schedules a shortcut was not trained on, N putting step K inside the lab shortcut's band
# (t ~ 250-360): the project's default, exp_karras (t = 255 and 304), and the teacher's best schedules at 8 and 20
# steps, beta (t = 314 and 320) and align_your_steps (t = 301 and 307). Does the shortcut carry over to them?
TRANSFER_HANDOFFS = {EXP_KARRAS: ((12, 7), (20, 12)), schedule("beta"): ((11, 7), (19, 12)),
                     schedule("align_your_steps"): ((11, 7), (19, 12))}


def shortcut_plan(extra: dict) -> tuple[list[ShortcutRun], list[ShortcutRun]]:
    """A shortcut file's rows: every hand-off it was trained on (each captured step K of each run length N, on its
    schedule), and the transfer runs of :data:`TRANSFER_HANDOFFS` on the other schedules."""
    from ..models.shortcut_file import trained_schedule

    name, params = trained_schedule(extra)
    trained = schedule(name, **params)
    pairs = sorted((k, c["num_inference_steps"]) for c in extra["captured"] for k in c["capture_steps"])
    ks = [k for k, _ in pairs]
    own = [ShortcutRun(trained, n, k, tag=ks.count(k) > 1) for k, n in pairs]
    transfer = [ShortcutRun(sched, n, k, trained=False) for sched, runs in TRANSFER_HANDOFFS.items()
                if sched != trained for n, k in runs]
    return own, transfer


def shortcut_rows(results: Results) -> tuple[list[ShortcutRun], list[ShortcutRun]]:
    """The shortcut rows of ``results`` as runs (trained, transfer), in hand-off order."""
    runs = {}
    for r in results.runs:
        if r.group == "shortcut" and r.config not in runs:
            # The row's name is the one ShortcutRun.name gave it: the kind of run that names it so.
            kinds = (ShortcutRun(schedule_of(r.schedule), r.teacher_steps, r.nfe - 1, trained, tag)
                     for trained, tag in ((True, False), (True, True), (False, False)))
            runs[r.config] = next(run for run in kinds if run.name == r.name)
    ordered = sorted(runs.values(), key=lambda run: (run.schedule.label, run.handoff, run.steps))
    return [r for r in ordered if r.trained], [r for r in ordered if not r.trained]


def run_shortcut_rows(bench: Bench, guidance: float, seed_sets: Iterable[int], only: Collection[Config] = ()):
    """The rows of the committed shortcut (:func:`shortcut_plan`; each sampled again only when the file changed,
    and the rows of an earlier file dropped), the whole runs each K+1 cuts short, and the teacher on the
    shortcut's schedule at each trained run's NFE. With ``only``, just the shortcut rows it names and the whole
    runs they cut short."""
    from ..models.shortcut_file import load_shortcut
    from ..pipelines import ShortcutCallback
    from . import SHORTCUT_PATH
    from .sampling import sample_teacher

    shortcut = load_shortcut(SHORTCUT_PATH)
    digest = files_sha256(SHORTCUT_PATH)
    own, transfer = shortcut_plan(shortcut.metadata["extra"])
    # rows of an earlier file, or at another guidance than the teacher rows they are compared with
    bench.discard(lambda r: r.group == "shortcut" and (r.sha256 != digest or r.guidance != guidance))
    ac = bench.pipe.scheduler.alphas_cumprod
    runs = [run for run in (*own, *transfer) if run.config in only] if only else [*own, *transfer]
    for s in seed_sets:
        for run in () if only else own:
            bench.schedule_once(run.schedule, run.handoff + 1, guidance, s)
        for run in runs:
            bench.schedule_once(run.schedule, run.steps, guidance, s)
            if bench.results.has(run.config, s):
                continue
            samples = sample_teacher(bench.pipe, run.schedule.sigmas(run.steps, ac), guidance, bench.n, SEED_BASE + s,
                                     callback=ShortcutCallback(shortcut, handoff_step=run.handoff),
                                     desc=f"shortcut {run.name}")
            bench.record("shortcut", run.name, run.handoff + 1, s, samples, guidance=guidance,
                         teacher_steps=run.steps, schedule=run.schedule.label, file=SHORTCUT_PATH.name,
                         sha256=digest)


STUDENT_NFES = (1, 2, 4, 8)
STUDENT_TEACHER_NFES = (1, 2, 4, 8, 20)  # NFE 50: seed set 0 of the schedule grid
ONE_STEP_START = "teacher: one call at t=999, guidance 1 (where a generator read as epsilon starts)"


def run_student_rows(bench: Bench, guidance: float, seed_sets: Iterable[int], nfes: Collection[int] = STUDENT_NFES,
                     teacher_rows: bool = True):
    """Every committed student at each of its NFEs in ``nfes``, at its recommended guidance, and (with
    ``teacher_rows``) the teacher at ``guidance`` beside them. The rows and records of a student file that changed
    or is gone are dropped first: a row's seed sets all come from one file, and only committed files are
    reported."""
    from ..pipelines import load_student
    from ..schedulers import ExpKarrasScheduler
    from . import STUDENTS_DIR
    from .sampling import load_teacher, sample_teacher

    paths = sorted(STUDENTS_DIR.glob("*.safetensors"))
    digests = {path.name: files_sha256(path) for path in paths}
    bench.discard(lambda r: r.group == "student" and r.file is not None and digests.get(r.file) != r.sha256,
                  stale_file=lambda f: f.file not in digests)
    seed_sets = list(seed_sets)
    for s in seed_sets if teacher_rows else ():
        for nfe in STUDENT_TEACHER_NFES:
            bench.schedule_once(EXP_KARRAS, nfe, guidance, s)
    for path in paths:
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
        digest = digests[path.name]
        for s in seed_sets:
            for nfe in sorted(set(info.nfe_schedules) & set(nfes)):
                done = bench.results.has(Config("student", name, nfe), s)
                if done and done.sha256 == digest:
                    continue  # this very file was scored on these seeds already
                samples = sample_teacher(pipe, None, info.guidance, bench.n, SEED_BASE + s, steps=nfe,
                                         desc=f"{path.stem} NFE {nfe}")
                bench.record("student", name, nfe, s, samples, guidance=info.guidance, method=info.method,
                             file=path.name, sha256=digest)
        if teacher_rows and info.method in ("gdd", "disback"):
            # Where every one-step student starts: the same single call with the LoRA off, read as the model
            # predicts (the student's scheduler may read v or x0; it refuses to run without its adapter).
            pipe.disable_lora()
            pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)
            for s in seed_sets:
                if bench.results.has(Config("student", ONE_STEP_START, 1), s):
                    continue
                samples = sample_teacher(pipe, None, 1.0, bench.n, SEED_BASE + s, steps=1, desc=ONE_STEP_START)
                bench.record("student", ONE_STEP_START, 1, s, samples, guidance=1.0)


GOAL_REPEATS = 10
GOAL_STUDENT_NFES = (1, 2, 4)  # the students' goals
GOAL_REFERENCE_NFES = (4, 8, 20)  # the teacher's best at these NFEs is what the goals hold the rows against


def run_goal_rows(bench: Bench, guidance: float, repeats: int = GOAL_REPEATS):
    """The rows the goals of issue 11 compare, on ``repeats`` seed sets, one whole set at a time: the floors (real
    images and their VAE round trip), the shortcut's 7+1 and 12+1 (and the whole runs they cut short, which the
    report reads what limits them from), every student at each NFE of GOAL_STUDENT_NFES,
    and the teacher's best schedule at each NFE they are held against (chosen by :meth:`Results.ranking` on the
    seed sets every schedule ran, which these rows do not change). A goal's paired difference over 10 seed sets
    has a 95 % interval 3.5 times narrower than over the grid's 3 (2.26 standard errors of sd/sqrt(10) against
    4.30 of sd/sqrt(3))."""
    refs = [bench.results.teacher_best(nfe) for nfe in GOAL_REFERENCE_NFES]
    if None in refs:
        missing = [nfe for nfe, ref in zip(GOAL_REFERENCE_NFES, refs) if ref is None]
        raise ResultsFileError(f"the goals group samples the teacher's best schedule at NFE "
                               f"{', '.join(map(str, missing))}, which the schedules group ranks: run it first")
    for s in range(repeats):
        if not {(name, s) for name in (REAL_FLOOR, VAE_FLOOR)} <= {f.key for f in bench.results.floors}:
            run_floors(bench, [s])
        for ref in refs:
            bench.schedule_once(schedule_of(ref.name), ref.nfe, guidance, s)
        run_shortcut_rows(bench, guidance, [s], only=(SEVEN_PLUS_ONE, TWELVE_PLUS_ONE))
        run_student_rows(bench, guidance, [s], nfes=GOAL_STUDENT_NFES, teacher_rows=False)


def student_row_name(path: Path) -> str:
    """The report row of a student file: a progressive run's rounds (``progressive_nfe8``, ...) share one row."""
    import re

    return re.sub(r"_nfe\d+$", "", path.stem)


def measure_teacher_cost() -> TeacherCost:
    """The teacher's training cost, timed by lab.teacher on this machine (its stages on short runs of the
    training code): the one place the benchmark calls the teacher's training."""
    from .teacher import measure_training_cost

    return TeacherCost(**measure_training_cost())


def run_costs(bench: Bench):
    """Time the teacher's training on as many threads as the student files recorded (the most common count;
    this process's own where none did), so that the shares compare like with like."""
    counts = collections.Counter(f.threads for f in bench.results.students if f.threads)
    threads = counts.most_common(1)[0][0] if counts else torch.get_num_threads()
    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cost = measure_teacher_cost()
    finally:
        torch.set_num_threads(own)
    bench.save(Results(teacher_cost=cost))
    print(f"teacher training: {teacher_cost_terms(cost)} = {cost.seconds / 60:.1f} min on {cost.threads} thread(s)")


def teacher_cost_terms(cost: TeacherCost) -> str:
    """Each stage's seconds per step times its steps, as the report spells them."""
    terms = f"VAE {cost.vae_seconds_per_step:.3f} s/step x {cost.vae_steps}"
    if cost.features_steps:
        terms = f"feature network {cost.features_seconds_per_step:.3f} s/step x {cost.features_steps} + " + terms
    if cost.decoder_steps:
        terms += f" + decoder fine-tuning {cost.decoder_seconds_per_step:.3f} s/step x {cost.decoder_steps}"
    return terms + f" + UNet {cost.unet_seconds_per_step:.3f} s/step x {cost.unet_steps} (batch {cost.unet_batch})"


# --- the report ---------------------------------------------------------------------------------------


def fmt_fd(st: Stats | None) -> str:
    """Seed set 0's FD (comparable across every row), then the mean ± sd where more seed sets ran."""
    if st is None:
        return "–"
    first = "–" if st.fd0 is None else f"{st.fd0:.3f}"  # another seed set's FD would not compare with the others
    if st.fd_sd is not None:
        return f"{first} ({st.runs} sets: {st.fd:.3f} ± {st.fd_sd:.3f})"
    return first if st.fd0 is not None else f"– (1 set, not 0: {st.fd:.3f})"


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
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_fd_vs_nfe(results: Results, names: list[str], path: Path):
    import matplotlib.ticker

    with figure(path, "NFE (DPM-Solver++ 2M steps)", "FD (classifier features, seed set 0) ↓") as ax:
        for name in names:
            pts = [(n, results.stats(teacher_on(name, n))) for n in NFES]
            pts = [(n, st.fd0) for n, st in pts if st and st.fd0 is not None]
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
            ax.axhline(start, color="grey", linestyle="--", label="teacher, one call at t=999 (a generator read "
                                                                  "as\nepsilon starts here; one read as v, from noise)")


def reference(results: Results, nfe: int) -> tuple[Config, str] | None:
    """The teacher's best schedule at ``nfe`` and how it was chosen."""
    ranking = results.ranking(nfe)
    if ranking is None:
        return None
    count = len(ranking.fds)
    return teacher_on(ranking.best, nfe), f"{ranking.best}, best of {count} schedule{'s' if count > 1 else ''}"


def goal_lines(goals: list[Goal]) -> list[str]:
    return [f"- {g.goal}: {g.measured} — {g.status}" for g in goals]


# --- the goals of issue 11 -----------------------------------------------------------------------------------


def vae_goals(results: Results) -> list[Goal]:
    """The VAE's goals on the seed sets both floors ran, each per-set difference paired (the same images): met
    where its 95 % interval clears the bound, NOT_SHOWN where only the mean does."""
    real = {f.seed_set: f for f in results.floors if f.name == REAL_FLOOR}
    vae = {f.seed_set: f for f in results.floors if f.name == VAE_FLOOR}
    common = sorted(set(real) & set(vae))
    fd_goal = "round-trip FD within 2x the real-data floor"
    acc_goal = "reconstructions classified as well as real images (within 1 point)"
    if not common:
        return [Goal("VAE", fd_goal, "not measured", None), Goal("VAE", acc_goal, "not measured", None)]
    # FD: vae - 2 real <= 0 per set
    fd = paired_over([vae[s].fd - 2 * real[s].fd for s in common], [vae[s].fd for s in common],
                    [real[s].fd for s in common])
    upper = "" if fd.sd is None else f"; 95 % interval up to {2 + (fd.mean + fd.half_width) / fd.fd_b:.2f}x"
    goals = [Goal("VAE", fd_goal, f"FD {fd.fd_a:.2f} against {fd.fd_b:.2f}: {fd.fd_a / fd.fd_b:.2f}x{upper} "
                  f"({sets(fd.k)})", shown_at_most(fd, 0.0))]
    with_accuracy = [s for s in common if real[s].accuracy is not None and vae[s].accuracy is not None]
    if not with_accuracy:
        return goals + [Goal("VAE", acc_goal, "real-image accuracy not measured (`--groups floors`)", None)]
    # accuracy: real - vae <= 1 point per set
    acc = paired_over([real[s].accuracy - vae[s].accuracy - 0.01 for s in with_accuracy],
                     [vae[s].accuracy for s in with_accuracy], [real[s].accuracy for s in with_accuracy])
    gap = 100 * (acc.fd_a - acc.fd_b)
    interval = ("" if acc.sd is None else
                f"; 95 % interval {gap - 100 * acc.half_width:+.1f} to {gap + 100 * acc.half_width:+.1f}")
    return goals + [Goal("VAE", acc_goal, f"accuracy {acc.fd_a:.3f} against {acc.fd_b:.3f} ({gap:+.1f} points"
                         f"{interval}; {sets(acc.k)})", shown_at_most(acc, 0.0))]


def sets(k: int) -> str:
    return "1 seed set" if k == 1 else f"{k} seed sets"


def shown_at_most(p: Paired, bound: float) -> bool | str:
    """A "within" goal on a margin: met where the 95 % interval's upper end is at most ``bound``, NOT_SHOWN where
    only the mean is (or a single seed set gives no interval), missed where the mean is past it."""
    if p.mean > bound:
        return False
    return True if p.sd is not None and p.mean + p.half_width <= bound else NOT_SHOWN


def paired_goal(results: Results, topic: str, goal: str, rows: list[Config], nfe: int, met, pick) -> Goal:
    """A goal on the best of ``rows`` (chosen by ``pick`` on their Paired against the teacher's best at ``nfe``),
    met when ``met`` holds for that Paired."""
    ref = reference(results, nfe)
    pairs = [(p, row) for row in rows if ref and (p := results.paired(row, ref[0]))]
    if not pairs:
        return Goal(topic, goal, "not measured", None)
    p, row = min(pairs, key=lambda pr: pick(pr[0]))
    who = f"`{row.name}` " if len(rows) > 1 else ""
    interval = "" if p.sd is None else (f"; 95 % interval {100 * (p.mean - p.half_width) / p.fd_b:+.1f} to "
                                        f"{p.upper_gap_percent():+.1f} %")
    return Goal(topic, goal, f"{who}FD {p.fd_a:.3f} against {p.fd_b:.3f} ({ref[1]}): {p.fd_a / p.fd_b:.2f}x "
                f"({p.gap_percent:+.1f} %{interval}), paired {p.describe()}", met(p))


def shown_better(p: Paired) -> bool | str:
    """A "better than" goal: met where the 95 % interval of the paired difference lies below zero; a lower mean
    within the noise of the seed sets shows nothing (NOT_SHOWN); a higher one misses."""
    if p.mean >= 0:
        return False
    return True if p.significant else NOT_SHOWN


def shown_within(percent: float):
    """A "within X %" goal: met where the upper end of the paired difference's 95 % interval is within it; a
    mean within it whose interval reaches past it is NOT_SHOWN; a mean past it misses (:func:`shown_at_most` on
    FD(a) - FD(b) against ``percent`` of FD(b))."""
    return lambda p: shown_at_most(p, percent / 100 * p.fd_b)


SEVEN_PLUS_ONE, TWELVE_PLUS_ONE = Config("shortcut", "7+1", 8), Config("shortcut", "12+1", 13)


def shortcut_goals(results: Results) -> dict[str, Goal]:
    return {
        "7+1": paired_goal(results, "shortcut", "7+1 better than the teacher's best 8 steps", [SEVEN_PLUS_ONE], 8,
                           shown_better, lambda p: p.mean),
        "12+1": paired_goal(results, "shortcut", "12+1 within 5 % of the teacher's best 20 steps", [TWELVE_PLUS_ONE],
                            20, shown_within(5), lambda p: p.gap_percent),
    }


def student_names(results: Results) -> list[str]:
    return sorted({r.name for r in results.runs if r.group == "student" and r.name != ONE_STEP_START})


def student_goals(results: Results) -> list[Goal]:
    def at(nfe):
        return [Config("student", name, nfe) for name in student_names(results)
                if results.stats(Config("student", name, nfe))]

    return [
        paired_goal(results, "students", "a 4-NFE student better than the teacher's best 4 steps", at(4), 4,
                    shown_better, lambda p: p.mean),
        paired_goal(results, "students", "a 2-NFE student within 25 % of the teacher's best 20 steps", at(2), 20,
                    shown_within(25), lambda p: p.gap_percent),
        paired_goal(results, "students", "the best one-step student within 1.5x of the teacher's best 20 steps",
                    at(1), 20, shown_within(50), lambda p: p.gap_percent),
    ]


COST_SHARE_GOAL = 0.25


def cost_goals(results: Results) -> dict[str, Goal]:
    """Per student file: its training seconds against the teacher's training."""
    goals = {}
    teacher_cost = results.teacher_cost
    for f in sorted(results.students, key=lambda f: f.file):
        goal = f"`{f.file}` distilled in at most {100 * COST_SHARE_GOAL:.0f} % of the teacher's training"
        if f.train_seconds is None or teacher_cost is None:
            what = ("not recorded" if f.train_seconds is None
                    else "the teacher's cost is not measured (`--groups costs`)")
            goals[f.file] = Goal("costs", goal, what, None)
        elif f.threads is not None and f.threads != teacher_cost.threads:
            goals[f.file] = Goal("costs", goal, f"{f.train_seconds / 60:.1f} min on {f.threads} thread(s), the "
                                                f"teacher timed on {teacher_cost.threads}: not comparable", None)
        else:
            share = f.train_seconds / teacher_cost.seconds
            goals[f.file] = Goal("costs", goal, f"{f.train_seconds / 60:.1f} min, {100 * share:.1f} %",
                                 share <= COST_SHARE_GOAL)
    return goals


GDD_DRIFT_GOAL = 0.05  # the last evaluation's FD at most this fraction above the run's best


def gdd_goal(results: Results) -> Goal:
    """GDD must not get worse as it trains: its last evaluated FD against its best."""
    goal = f"GDD does not get worse as it trains (last FD within {100 * GDD_DRIFT_GOAL:.0f} % of its best)"
    run = next((f for f in sorted(results.students, key=lambda f: f.key) if f.method == "gdd" and f.evaluations), None)
    if run is None:
        return Goal("students", goal, "no GDD run evaluated along training (`--eval-every`)", None)
    best = min(run.evaluations, key=lambda e: e.fd)
    last = max(run.evaluations, key=lambda e: e.step)
    held = f"; the file holds step {run.selected.step}" if run.selected else ""

    def accuracy(e: Evaluation) -> str:  # beside the FD the goal reads, so that a drift in it shows too
        return f" (class accuracy {e.accuracy:.3f})" if e.accuracy is not None else ""

    return Goal("students", goal, f"`{run.name}`: best FD {best.fd:.2f} at step {best.step}{accuracy(best)}, last "
                f"{last.fd:.2f} at step {last.step}{accuracy(last)} ({100 * (last.fd / best.fd - 1):+.1f} %){held}",
                last.fd <= (1 + GDD_DRIFT_GOAL) * best.fd)


def goals(results: Results) -> list[Goal]:
    """Every goal of issue 11 the benchmark measures."""
    return (vae_goals(results) + list(shortcut_goals(results).values()) + student_goals(results)
            + [gdd_goal(results)] + list(cost_goals(results).values()))


# --- the sections -------------------------------------------------------------------------------------


def header_section(results: Results) -> list[str]:
    return ["# Lab report", "",
            "Generated by `python -m direct_distill benchmark` from `lab/results.json`; do not edit by hand.",
            "", f"Teacher: `lab/assets/teacher` (class-conditional latent diffusion on Fashion-MNIST). "
            f"Every row samples the same {results.sample_count()} seeded initial latents and balanced labels "
            f"({(results.sample_count() or 0) // len(CLASS_NAMES)} per class); FD is the Fréchet distance to the "
            "10,000 real test images in the lab "
            "classifier's 128-d feature space, accuracy is the classifier's agreement with the prompt. "
            "FD cells give seed set 0 (the same noise for every row); where more seed sets ran, their mean "
            "± standard deviation follows in brackets. Two rows are compared on the seed sets both ran (a "
            "paired difference), which counts as significant when its 95 % confidence interval (Student's t on "
            "the seed sets: 4.30 standard errors for 3, 2.26 for 10) excludes zero. The rows a goal compares (the "
            "goals group: the floors, 7+1 and 12+1, the students at 1, 2 and 4 NFE, the teacher's best schedule at "
            "4, 8 and 20 steps) ran on more seed sets than the rest; the teacher's best schedule at an NFE is chosen "
            "on the seed sets every schedule ran. A goal is met when that interval clears it, **not shown** when "
            "only the mean does.", ""]


def floors_section(results: Results) -> list[str]:
    if not results.floors:
        return []
    lines = ["## Floors", "", "| reference | FD | accuracy |", "|---|---|---|"]
    for name, label in ((REAL_FLOOR, f"{results.floors[0].n} real training images"),
                        (VAE_FLOOR, "the same images through the VAE (encode, decode)")):
        rows = [f for f in results.floors if f.name == name]
        if not rows:
            continue
        fds, accs = [f.fd for f in rows], [f.accuracy for f in rows if f.accuracy is not None]
        sd = f" ± {statistics.stdev(fds):.2f}" if len(fds) > 1 else ""
        acc = f"{statistics.mean(accs):.3f}" if accs else "–"
        lines.append(f"| {label} | {statistics.mean(fds):.2f}{sd} | {acc} |")
    return lines + ["", "The VAE's goals:", "", *goal_lines(vae_goals(results)), ""]


def guidance_section(results: Results) -> list[str]:
    rows = sorted((r for r in results.runs if r.group == "cfg"), key=lambda r: r.guidance)
    if not rows:
        return []
    return ([f"## Guidance (DPM++ 2M Karras, {CFG_SWEEP_STEPS} steps)", "", "| guidance | FD | accuracy |",
             "|---|---|---|"]
            + [f"| {r.guidance:g} | {r.fd:.2f} | {r.accuracy:.3f} |" for r in rows]
            + ["", f"Best guidance (lowest FD): **{results.best_guidance:g}**, {teacher_guidance_text(results)}."
                   if results.best_guidance is not None else
                   "Best guidance: the sweep has not finished (it is chosen once every guidance ran).", ""])


def teacher_guidance_text(results: Results) -> str:
    """What guidance the teacher rows below the sweep were sampled at, from the rows themselves."""
    used = sorted({r.guidance for r in results.runs if r.group in ("schedule", "shortcut")})
    if not used or used == [results.best_guidance]:
        return "used for every row below"
    return f"but the teacher rows below were sampled at {', '.join(f'{g:g}' for g in used)} (`--guidance`)"


def teacher_quality_section(results: Results) -> list[str]:
    teacher50 = results.stats(teacher_on(KARRAS, 50))
    if not teacher50:
        return []
    real = [f.fd for f in results.floors if f.name == REAL_FLOOR]
    floor_txt = f" (real-data floor {statistics.mean(real):.2f})" if real else ""
    guidance = next(r.guidance for r in results.runs if r.config == teacher_on(KARRAS, 50))
    return ["## Teacher quality", "",
            f"DPM++ 2M Karras, 50 steps, guidance {guidance:g}, {results.sample_count()} samples: FD "
            f"**{teacher50.fd:.2f}**{floor_txt}, class accuracy **{teacher50.accuracy:.3f}**.", ""]


def schedules_section(results: Results, plots: Path) -> list[str]:
    if not any(r.group == "schedule" for r in results.runs):
        return []
    names = [s.label for s in SCHEDULES if any(r.name == s.label for r in results.runs)]
    columns = ["| schedule | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---|" * len(NFES)]
    lines = ["## Schedules (DPM++ 2M)", "", f"The peers ComfyUI users pick, at its settings ({PEER_SETTINGS}).", "",
             "FD (lower is better):", "", *columns]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(fmt_fd(results.stats(teacher_on(name, k))) for k in NFES) + " |")
    lines += ["", "Class accuracy:", "", *columns]
    for name in names:
        cells = [results.stats(teacher_on(name, k)) for k in NFES]
        lines.append(f"| {name} | " + " | ".join(f"{c.accuracy:.3f}" if c else "–" for c in cells) + " |")
    # The cost depends on the NFE only; the karras rows stand for every schedule.
    cells = [results.stats(teacher_on(KARRAS, k)) for k in NFES]
    lines += ["", "Seconds per image (CPU, batch 500, CFG doubles the batch):", "", *columns,
              "| any schedule | " + " | ".join(f"{c.seconds_per_image * 1e3:.1f} ms" if c else "–" for c in cells)
              + " |", "", "![FD vs NFE](plots/fd_vs_nfe.png)", ""]
    plot_fd_vs_nfe(results, names, plots / "fd_vs_nfe.png")
    return lines + exp_karras_verdict_section(results) + best_schedule_section(results)


def exp_karras_verdict_section(results: Results) -> list[str]:
    lines = ["### Does exp_karras beat karras?", "",
             f"Paired over the same seed sets: FD({EXP_KARRAS.label}) − FD({KARRAS.label}); negative means "
             "exp_karras is better.", "", "| NFE | difference | seed sets | verdict |", "|---|---|---|---|"]
    for nfe in NFES:
        p = results.paired(teacher_on(EXP_KARRAS, nfe), teacher_on(KARRAS, nfe))
        if p:
            spread = f" ± {p.sd:.3f}" if p.sd is not None else ""
            lines.append(f"| {nfe} | {p.mean:+.3f}{spread} | {p.k} | {p.verdict('exp_karras', 'karras')} |")
    best = {}
    for nfe in NFES:
        candidates = [(st.fd, s) for s in EXP_KARRAS_P if (st := results.stats(teacher_on(s, nfe)))]
        if candidates:
            best[nfe] = min(candidates, key=lambda c: c[0])[1]
    if best:
        lines += ["", "Best exp_karras p per NFE: " + ", ".join(
            f"NFE {k}: p={dict(s.params)['p']:g}" for k, s in best.items()) + "."]
    return lines + [""]


def best_schedule_section(results: Results) -> list[str]:
    nfes = sorted({r.nfe for r in results.runs if r.group == "schedule"})
    rankings = [r for nfe in nfes if (r := results.ranking(nfe))]
    if not rankings:
        return []
    lines = ["### The teacher's best schedule per NFE", "",
             "Every schedule's mean FD on the seed sets all of them ran; the best against the runner-up, paired. "
             "The best is the reference for the shortcut and the students at that NFE.", "",
             "| NFE | schedules (seed sets) | best: FD | runner-up: FD | best − runner-up | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rankings:
        counts = f"{len(r.fds)} ({len(r.seed_sets)})"
        if r.best_vs_runner_up is None:
            lines.append(f"| {r.nfe} | {counts} | {r.best}: {r.fds[r.best]:.3f} | – | – | the only schedule run |")
            continue
        runner, p = r.order[1], r.best_vs_runner_up
        if p.sd is None:
            call = f"{r.best} first (one seed set)"
        elif p.significant:
            call = f"{r.best} best (95 % interval of the difference below zero)"
        else:
            call = f"{r.best} first, not separable from {runner}"
        spread = f" ± {p.sd:.3f}" if p.sd is not None else ""
        lines.append(f"| {r.nfe} | {counts} | {r.best}: {r.fds[r.best]:.3f} | {runner}: {r.fds[runner]:.3f} | "
                     f"{p.mean:+.3f}{spread} | {call} |")
    return lines + [""]


def shortcut_section(results: Results) -> list[str]:
    own, transfer = shortcut_rows(results)
    own = [run for run in own if run.steps]
    if not own:
        return []
    from ..models.io import read_safetensors
    from . import SHORTCUT_PATH

    trained = own[0].schedule.label
    lines = ["## The NAFNet shortcut (K teacher steps + 1 shortcut call)", "",
             f"K steps of an N-step {trained} run (the schedule and the run lengths the shortcut was trained on), "
             "then the shortcut; against the whole N-step run it cuts short (whose final latent the shortcut learnt "
             f"to predict), against the teacher's {trained} run at the same NFE and against the teacher's best "
             "schedule at that NFE, each paired over the seed sets both ran.", ""]
    if SHORTCUT_PATH.is_file():
        psnr = json.loads(read_safetensors(SHORTCUT_PATH)[1].get("extra", "{}")).get("heldout_psnr", {})
        if psnr:
            lines += ["Held-out PSNR against the final latent of the run each pair comes from (latent space, peak = "
                      "the range of the held-out targets; `input` is x_t itself):", "", "| held-out pairs | " +
                      " | ".join(k for k in psnr) + " |", "|---|" + "---|" * len(psnr)]
            for key in sorted({t for v in psnr.values() for t in v}):
                lines.append(f"| {key} | " + " | ".join(f"{v.get(key, float('nan')):.2f} dB" for v in psnr.values())
                             + " |")
            lines.append("")
    goals_by_run = shortcut_goals(results)

    def whole_run(run: ShortcutRun) -> tuple[str, str]:
        p = results.paired(run.config, run.finishes)
        return (f"{run.steps} steps: {fmt_fd(results.stats(run.finishes))}" if results.stats(run.finishes) else "–",
                p.describe() if p else "–")

    lines += ["| run | NFE | FD | accuracy | the whole run: FD | run − whole run (paired) | "
              f"run − {trained} at that NFE (paired) | teacher's best at that NFE: FD | run − teacher's best "
              "(paired) | goal |", "|---|" + "---|" * 9]
    for run in own:
        st = results.stats(run.config)
        same_nfe = results.paired(run.config, teacher_on(run.schedule, run.config.nfe))
        ref = reference(results, run.config.nfe)
        p = results.paired(run.config, ref[0]) if ref else None
        ref_cell = f"{ref[1]}: {fmt_fd(results.stats(ref[0]))}" if ref else "–"
        goal = goals_by_run.get(run.name)
        goal_cell = f"{goal.goal}: {goal.status}" if goal else "–"
        lines.append(f"| {run.name} | {run.config.nfe} | {fmt_fd(st)} | {st.accuracy:.3f} | "
                     + " | ".join(whole_run(run)) + f" | {same_nfe.describe() if same_nfe else '–'} | {ref_cell} | "
                     f"{p.describe() if p else '–'} | {goal_cell} |")
    lines += ["", *goal_lines(list(goals_by_run.values())), "", *shortcut_limits(results, own)]
    transfer = [run for run in transfer if run.steps]
    if transfer:
        lines += ["### The same hand-offs from runs of other schedules", "",
                  "K steps of an N-step run of a schedule the shortcut was not trained on, N putting step K in its "
                  f"band; against that whole run, and against the same K+1 on {trained}.", "",
                  "| run | NFE | FD | accuracy | the whole run: FD | run − whole run (paired) | "
                  f"run − the same K+1 on {trained} (paired) |", "|---|" + "---|" * 6]
        by_handoff = {}
        for run in own:
            by_handoff.setdefault(run.handoff, run)
        for run in transfer:
            st = results.stats(run.config)
            p = results.paired(run.config, by_handoff[run.handoff].config) if run.handoff in by_handoff else None
            lines.append(f"| {run.name} | {run.config.nfe} | {fmt_fd(st)} | {st.accuracy:.3f} | "
                         + " | ".join(whole_run(run)) + f" | {p.describe() if p else '–'} |")
        lines.append("")
    return lines


def shortcut_limits(results: Results, own: list[ShortcutRun]) -> list[str]:
    """Each goal's gap split in two, paired: what the whole run the shortcut learnt to finish loses to the
    teacher's best schedule, and what the jump loses to that whole run."""
    lines = []
    runs = {run.config: run for run in own}
    for config, goal_nfe in ((SEVEN_PLUS_ONE, 8), (TWELVE_PLUS_ONE, 20)):
        run, ref = runs.get(config), reference(results, goal_nfe)
        if run is None or ref is None:
            continue
        schedule_part = results.paired(run.finishes, ref[0])
        jump_part = results.paired(run.config, run.finishes)
        if schedule_part and jump_part:
            lines.append(f"- {run.name} against {ref[0].name} at {goal_nfe} steps: the whole {run.steps}-step "
                         f"{run.schedule.label} run it learnt to finish is {schedule_part.describe()} (FD "
                         f"{schedule_part.fd_a:.3f} against {schedule_part.fd_b:.3f}); the jump adds "
                         f"{jump_part.describe()}.")
    return ["What limits it:", "", *lines, ""] if lines else []


def student_section(results: Results) -> list[str]:
    names = sorted({r.name for r in results.runs if r.group == "student"})
    if not names:
        return []
    cols = sorted(set(STUDENT_NFES) | {20, 50})
    lines = ["## LoRA students (FD / class accuracy)", "",
             "The reference row is the teacher's best schedule at each NFE (DPM++ 2M).", "",
             "| model | " + " | ".join(f"NFE {k}" for k in cols) + " |", "|---|" + "---|" * len(cols)]

    def cell(st):
        return f"{fmt_fd(st)} / {st.accuracy:.3f}" if st else "–"

    for name in names:
        label = name if name == ONE_STEP_START else f"student `{name}`"
        lines.append(f"| {label} | " + " | ".join(cell(results.stats(Config("student", name, k))) for k in cols) + " |")
    refs = [reference(results, k) for k in cols]
    lines.append("| teacher, its best schedule | " + " | ".join(
        f"{cell(results.stats(ref[0]))} ({ref[0].name})" if ref else "–" for ref in refs) + " |")
    return lines + ["", *goal_lines(student_goals(results)), ""]


def cost_section(results: Results) -> list[str]:
    """Each student file's recorded training seconds next to the teacher's training cost."""
    files = sorted(results.students, key=lambda s: s.file)
    teacher_cost = results.teacher_cost
    if not files:
        return []
    goals_by_file = cost_goals(results)
    lines = ["## What distillation costs", "",
             "Seconds in the training loop (with a teacher pool, `sfd --pool`, its capture too), recorded in each "
             "student file (CPU, one thread unless noted). "
             + (f"The teacher's training, timed on this machine with the same code: "
                f"{teacher_cost_terms(teacher_cost)} = **{teacher_cost.seconds / 60:.1f} min** on "
                f"{teacher_cost.threads} thread(s)." if teacher_cost
                else "The teacher's cost is not measured yet (`--groups costs`)."), "",
             f"| student file | NFE | training | share of the teacher's training | goal: at most "
             f"{100 * COST_SHARE_GOAL:.0f} % |", "|---|---|---|---|---|"]
    for f in files:
        sec = f.train_seconds
        comparable = teacher_cost and f.threads in (None, teacher_cost.threads)
        share = f"{100 * sec / teacher_cost.seconds:.1f} %" if sec is not None and comparable else "–"
        threads = f" ({f.threads} threads)" if f.threads not in (None, 1) else ""
        lines.append(f"| `{f.file}` | {', '.join(map(str, f.nfes))} | "
                     f"{f'{sec / 60:.1f} min' if sec is not None else 'not recorded'}{threads} | {share} | "
                     f"{goals_by_file[f.file].status} |")
    return lines + [""]


def curve_section(results: Results, plots: Path) -> list[str]:
    """FD along training of the students that were evaluated as they trained; for runs of one method (DisBack
    with and without backtracking), the steps each needs to reach the best FD the slower of them reached."""
    files = {f.name: f for f in results.students if f.evaluations}
    if not files:
        return []
    runs = {name: f.evaluations for name, f in files.items()}
    start = results.stats(Config("student", ONE_STEP_START, 1))
    plot_curves(runs, plots / "one_step_curves.png", start=start.fd0 if start else None)
    lines = ["## One-step students along training", "",
             "FD of 1,000 samples of the student at regular steps (its own seeds, guidance 1). DisBack's steps are "
             "those of stage two; with backtracking, stage one (the degradation path) comes before them. The last "
             "column is the step whose generator the student file holds (the lowest-FD one, or the last for runs "
             "made with `--keep-last`). The weights evaluated and kept are the generator's own, "
             "or their exponential moving average for runs made with one (`--ema-decay`). The training run "
             "measured these FDs through the teacher's VAE as it was then, on 1,000 samples of its own seeds: "
             "they compare runs with one another; the rows above are the report's. A generator whose output is read "
             "as the teacher's epsilon starts from the teacher's own single call (the dashed line); one read as v "
             "(`--student-prediction v_prediction`) starts from noise, the teacher's epsilon read as v.", "",
             "![FD along training](plots/one_step_curves.png)", "",
             "| run | output read as | weights | first FD (step) | best FD (step) | last FD (step) | "
             "file holds step |",
             "|---|---|---|---|---|---|---|"]
    for name, evals in sorted(runs.items()):
        best = min(evals, key=lambda e: e.fd)
        held = files[name].selected.step if files[name].selected else evals[-1].step
        decay = files[name].training.get("ema_decay")
        weights = f"EMA, decay {decay:g}" if decay else "own"
        training = files[name].training  # a file without the setting reads it as its teacher does
        reads = training.get("student_prediction") or training.get("prediction_type") or "epsilon"
        lines.append(f"| `{name}` | {reads} | {weights} | {evals[0].fd:.2f} ({evals[0].step}) | "
                     f"{best.fd:.2f} ({best.step}) | {evals[-1].fd:.2f} ({evals[-1].step}) | {held} |")
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
    return lines + ["", *goal_lines([gdd_goal(results)]), ""]


def goals_section(results: Results) -> list[str]:
    return (["## Goals of issue 11", "", "| topic | goal | measured | status |", "|---|---|---|---|"]
            + [f"| {g.topic} | {g.goal} | {g.measured} | {g.status} |" for g in goals(results)] + [""])


def write_report(results: Results, path: Path = REPORT) -> str:
    """Writes the report (and its plots, beside it in ``plots/``) from ``results``; returns its text."""
    plots = path.parent / "plots"
    students = student_section(results)
    lines = (header_section(results) + floors_section(results) + guidance_section(results)
             + teacher_quality_section(results) + schedules_section(results, plots) + shortcut_section(results)
             + students + (cost_section(results) + curve_section(results, plots) if students else [])
             + goals_section(results))
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


GROUPS = ("floors", "cfg", "schedules", "shortcut", "students", "goals", "costs")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m direct_distill benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="floors,cfg,schedules",
                        help=f"comma-separated row groups to run: {', '.join(GROUPS)} (floors, cfg and costs are "
                             "measured again; schedules, shortcut, students and goals sample only the rows the results "
                             "file lacks: --fresh starts over)")
    parser.add_argument("--samples", type=int, default=1000,
                        help="samples per row, a multiple of 10 (balanced over the classes); every row of a results "
                             "file has the same")
    parser.add_argument("--repeats", type=int, default=3,
                        help="seed sets of the paired comparisons (schedules at NFE 4, 8, 12, 20, shortcut, students)")
    parser.add_argument("--goal-repeats", type=int, default=GOAL_REPEATS,
                        help="seed sets of the goals group: the rows each goal of the report compares (the floors, "
                             "the shortcut's 7+1 and 12+1, the students at 1, 2 and 4 NFE, the teacher's best "
                             "schedule at 4, 8 and 20 steps)")
    parser.add_argument("--fresh", action="store_true",
                        help="start a new results file (needed after retraining the teacher: rows never mix teachers)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="the CFG of the teacher's rows in the schedules, shortcut, students and goals groups, "
                             "one per results file (>= 1; default: the file's best, from the cfg group's sweep, which "
                             "it does not go with)")
    parser.add_argument("--schedules", default=None,
                        help="comma-separated schedule labels the schedules group runs (default: all of "
                             "them); a way to share the group between processes, which write one results file")
    parser.add_argument("--report-only", action="store_true", help="rewrite REPORT.md from results.json")
    args = parser.parse_args(argv)
    try:
        if args.report_only:
            print(write_report(Results.load()))
            return
        _run(parser, args)
    except ResultsFileError as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\n{parser.prog}: stopped; every row finished is saved in {RESULTS} (run again, the "
                         "schedules, shortcut, students and goals groups sample only the rows still missing)\n")


def _run(parser, args) -> None:
    if args.samples < 10 or args.samples % len(CLASS_NAMES) or min(args.repeats, args.goal_repeats) < 1:
        parser.error(f"--samples must be a multiple of {len(CLASS_NAMES)} (balanced classes), --repeats and "
                     "--goal-repeats >= 1")
    torch.manual_seed(0)
    groups = {group.strip() for group in args.groups.split(",")} - {""}
    unknown = groups - set(GROUPS)
    if unknown or not groups:
        named = f"unknown group(s) {', '.join(sorted(unknown))}" if unknown else "--groups names no group"
        parser.error(f"{named}; the groups are {', '.join(GROUPS)}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 1):
        parser.error(f"--guidance must be a finite number >= 1, got {args.guidance}")
    if args.guidance is not None and "cfg" in groups:
        parser.error("--guidance sets the CFG the cfg group's sweep would choose: leave out one of them "
                     f"(--groups {','.join(sorted(groups - {'cfg'})) or 'schedules'})")
    picked = SCHEDULES
    if args.schedules and "schedules" not in groups:
        parser.error("--schedules picks the rows of the schedules group, which --groups leaves out")
    if args.schedules:
        by_label = {sched.label: sched for sched in SCHEDULES}
        names = args.schedules.split(",")
        if unknown := [n for n in names if n not in by_label]:
            parser.error(f"unknown schedule(s) {', '.join(unknown)}; the schedules are {', '.join(by_label)}")
        picked = tuple(by_label[n] for n in names)
    if groups & {"schedules", "shortcut", "students", "goals"} and "cfg" not in groups and args.guidance is None:
        held = None if args.fresh or not RESULTS.is_file() else Results.load(RESULTS).best_guidance
        if held is None:  # never a silent default: another process may be running the sweep right now
            parser.error(f"the schedules, shortcut, students and goals groups sample the teacher at the CFG sweep's "
                         f"best guidance, which {RESULTS} does not hold yet: add the cfg group (--groups "
                         f"cfg,{','.join(sorted(groups))}), wait for the process running it, or give --guidance")
    if args.guidance is not None and not args.fresh and RESULTS.is_file():
        other = {r.guidance for r in Results.load(RESULTS).runs if r.group in ("schedule", "shortcut")}
        other.discard(args.guidance)
        if other:  # one guidance per file: the report compares every teacher row with every other
            parser.error(f"{RESULTS} holds teacher rows sampled at guidance "
                         f"{', '.join(f'{g:g}' for g in sorted(other))}, which rows at --guidance "
                         f"{args.guidance:g} would not compare with: start a new results file (--fresh)")
    bench = Bench(args.samples, fresh=args.fresh)
    if "floors" in groups:
        run_floors(bench, range(args.repeats))
    guidance = args.guidance if args.guidance is not None else bench.results.best_guidance
    if "cfg" in groups:
        guidance = run_cfg_sweep(bench)
    if "schedules" in groups:
        run_schedules(bench, guidance, args.repeats, schedules=picked)
    if "shortcut" in groups:
        run_shortcut_rows(bench, guidance, range(args.repeats))
    if "students" in groups:
        run_student_rows(bench, guidance, range(args.repeats))
    if "goals" in groups:
        run_goal_rows(bench, guidance, args.goal_repeats)
    if "costs" in groups:
        run_costs(bench)
    write_report(bench.results)
    print(f"report written to {REPORT}")


if __name__ == "__main__":
    main()
