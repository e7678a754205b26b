"""Side-by-side measurement on the lab teacher: every configuration samples the same seeded noise and
labels, and is scored by the lab evaluator (FD to the real test set, class accuracy, seconds/image).

Results are merged into ``lab/results.json`` (one entry per configuration and seed set), and
``lab/REPORT.md`` plus its plots are written from that file, so later row groups (shortcut, students)
add to the report without re-running earlier ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from ..schedulers import exp_karras_sigmas, exponential_sigmas, karras_sigmas, sigma_table, uniform_t_sigmas
from .data import CLASS_NAMES

LAB = Path(__file__).resolve().parent
RESULTS = LAB / "results.json"
REPORT = LAB / "REPORT.md"
PLOTS = LAB / "plots"
NFES = (4, 8, 12, 20, 50)
P_VALUES = (0.5, 1.0, 2.0)
SEED_BASE = 1000


def schedule_fns(alphas_cumprod) -> dict[str, Callable[[int], torch.Tensor]]:
    """The schedules compared in the report, each a function of the step count."""
    table = sigma_table(alphas_cumprod)
    lo, hi = float(table[0]), float(table[-1])
    fns = {
        "karras": lambda n: karras_sigmas(n, lo, hi),
        "exponential": lambda n: exponential_sigmas(n, lo, hi),
        "normal": lambda n: uniform_t_sigmas(n, alphas_cumprod=alphas_cumprod),
    }
    for p in P_VALUES:
        fns[f"exp_karras p={p:g}"] = lambda n, p=p: exp_karras_sigmas(n, p, alphas_cumprod=alphas_cumprod)
    return fns


class Bench:
    def __init__(self, samples: int, results_path: Path = RESULTS):
        from .evaluator import Evaluator
        from .sampling import load_teacher

        self.n = samples
        self.pipe = load_teacher()
        self.evaluator = Evaluator()
        self.path = results_path
        self.results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        self.grids: dict[str, torch.Tensor] = {}

    def record(self, group: str, name: str, nfe: int, seed_set: int, samples, extra: dict | None = None):
        entry = dict(group=group, name=name, nfe=nfe, seed_set=seed_set, n=len(samples.images),
                     fd=self.evaluator.fd(samples.images),
                     accuracy=self.evaluator.accuracy(samples.images, samples.labels),
                     seconds_per_image=samples.seconds_per_image, **(extra or {}))
        self.save({f"{group}|{name}|{nfe}|{seed_set}": entry})
        print(f"{group:10s} {name:22s} NFE {nfe:3d} seeds {seed_set}: FD {entry['fd']:.3f} "
              f"acc {entry['accuracy']:.3f} {entry['seconds_per_image'] * 1e3:.1f} ms/img")
        if seed_set == 0:
            save_grid(samples.images, samples.labels, PLOTS / f"grid_{slug(group, name, nfe)}.png")
        return entry

    def save(self, entries: dict):
        """Merge ``entries`` into the results file under a lock, so row groups can run in parallel."""
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
            on_disk.update(entries)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
            tmp.replace(self.path)
            self.results = on_disk

    def floors(self, repeats: int):
        from .sampling import decode

        for s in range(repeats):
            fd = self.evaluator.real_floor(self.n, seed=s)
            self.save({f"floor|real train vs test|0|{s}": dict(group="floor", name="real train vs test",
                                                               nfe=0, seed_set=s, n=self.n, fd=fd)})
        from .data import load_fashion_mnist

        x, y = load_fashion_mnist("train")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:self.n]
        with torch.no_grad():
            vae = self.pipe.vae
            lat = torch.cat([vae.encode(x[idx][i:i + 500]).latent_dist.mean for i in range(0, self.n, 500)])
        rec = decode(self.pipe, lat * vae.config.scaling_factor)
        self.save({"floor|VAE reconstruction|0|0": dict(
            group="floor", name="VAE reconstruction", nfe=0, seed_set=0, n=self.n, fd=self.evaluator.fd(rec),
            accuracy=self.evaluator.accuracy(rec, y[idx]))})

    def teacher(self, name: str, sigmas: torch.Tensor, guidance: float, seed_set: int, group: str = "schedule"):
        from .sampling import sample_teacher

        samples = sample_teacher(self.pipe, sigmas, guidance, self.n, SEED_BASE + seed_set,
                                 desc=f"{name} NFE {len(sigmas) - 1}")
        return self.record(group, name, len(sigmas) - 1, seed_set, samples, {"guidance": guidance})


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


CFG_SWEEP_STEPS = 20


def run_cfg_sweep(bench: Bench, guidances=(1.0, 1.5, 2.0, 3.0, 4.0)) -> float:
    """The teacher's best CFG (lowest FD) for DPM++ 2M Karras at CFG_SWEEP_STEPS steps."""
    fns = schedule_fns(bench.pipe.scheduler.alphas_cumprod)
    best = None
    for g in guidances:
        e = bench.teacher(f"karras cfg={g:g}", fns["karras"](CFG_SWEEP_STEPS), g, 0, group="cfg")
        if best is None or e["fd"] < best[1]:
            best = (g, e["fd"])
    bench.save({"meta|best_guidance": {"group": "meta", "guidance": best[0]}})
    return best[0]


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
            if f"schedule|exp_karras p=1|{nfe}|{s}" not in bench.results:
                bench.teacher("exp_karras p=1", exp_karras_sigmas(nfe, 1.0, alphas_cumprod=ac), guidance, s)
        for name, (steps, k) in SHORTCUT_RUNS.items():
            samples = sample_teacher(bench.pipe, exp_karras_sigmas(steps, 1.0, alphas_cumprod=ac), guidance, bench.n,
                                     SEED_BASE + s, callback=ShortcutCallback(shortcut, handoff_step=k),
                                     desc=f"shortcut {name}")
            bench.record("shortcut", name, k + 1, s, samples, {"guidance": guidance, "teacher_steps": steps})


STUDENT_NFES = (1, 2, 4, 8)
STUDENT_TEACHER_NFES = (1, 2, 4, 8, 20, 50)


def run_student_rows(bench: Bench, repeats: int):
    """Every committed student at each of its NFEs in STUDENT_NFES, at its recommended guidance."""
    from ..pipelines import load_student
    from . import STUDENTS_DIR
    from .sampling import load_teacher, sample_teacher

    guidance = bench.results.get("meta|best_guidance", {}).get("guidance", 2.0)
    ac = bench.pipe.scheduler.alphas_cumprod
    for s in range(repeats):
        for nfe in STUDENT_TEACHER_NFES:
            if f"schedule|exp_karras p=1|{nfe}|{s}" not in bench.results:
                bench.teacher("exp_karras p=1", exp_karras_sigmas(nfe, 1.0, alphas_cumprod=ac), guidance, s)
    for path in sorted(STUDENTS_DIR.glob("*.safetensors")):
        pipe = load_teacher()
        info = load_student(pipe, path)
        name = student_row_name(path)
        extra = info.extra
        bench.save({f"student_meta|{path.stem}": dict(
            group="student_meta", name=name, file=path.name, method=info.method, nfes=sorted(info.nfe_schedules),
            train_seconds=extra.get("train_seconds"), threads=extra.get("threads"), device=extra.get("device"),
            evaluations=extra.get("evaluations", []), backtracking=extra.get("backtracking"),
            selected=extra.get("selected"),
            training=extra.get("training", {}))})
        digest = file_digest(path)
        for s in range(repeats):
            for nfe in sorted(set(info.nfe_schedules) & set(STUDENT_NFES)):
                if bench.results.get(f"student|{name}|{nfe}|{s}", {}).get("sha256") == digest:
                    continue  # this very file was scored on these seeds already
                samples = sample_teacher(pipe, None, info.guidance, bench.n, SEED_BASE + s, steps=nfe,
                                         desc=f"{path.stem} NFE {nfe}")
                bench.record("student", name, nfe, s, samples,
                             {"guidance": info.guidance, "method": info.method, "file": path.name, "sha256": digest})
        if info.method in ("gdd", "disback"):
            # Where every one-step student starts: the same single call with the LoRA off.
            pipe.disable_lora()
            for s in range(repeats):
                if f"student|{ONE_STEP_START}|1|{s}" in bench.results:
                    continue
                samples = sample_teacher(pipe, None, 1.0, bench.n, SEED_BASE + s, steps=1, desc=ONE_STEP_START)
                bench.record("student", ONE_STEP_START, 1, s, samples, {"guidance": 1.0})


ONE_STEP_START = "teacher: one call at t=999, guidance 1 (where gdd and disback start)"


def file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def student_row_name(path: Path) -> str:
    """The report row of a student file: a progressive run's rounds (``progressive_nfe8``, ...) share one row."""
    import re

    return re.sub(r"_nfe\d+$", "", path.stem)


def run_costs(bench: Bench):
    """The teacher's training cost on this machine (its two stages timed on short runs of the training code),
    the reference every distillation's recorded seconds are compared with."""
    from .teacher import measure_training_cost

    cost = measure_training_cost()
    bench.save({"cost|teacher": {"group": "cost", **cost}})
    print(f"teacher training: VAE {cost['vae_seconds_per_step']:.3f} s/step x {cost['vae_steps']}, UNet "
          f"{cost['unet_seconds_per_step']:.3f} s/step x {cost['unet_steps']} = {cost['seconds'] / 60:.1f} min "
          f"on {cost['threads']} thread(s)")


def run_schedules(bench: Bench, guidance: float, repeats: int, repeat_nfes=(8, 12, 20),
                  repeat_names=("karras", "exp_karras p=1")):
    """Every schedule at every NFE on seed set 0; the key comparison on further seed sets for the spread."""
    fns = schedule_fns(bench.pipe.scheduler.alphas_cumprod)
    for s in range(repeats):
        for name, fn in fns.items():
            for nfe in NFES:
                if s == 0 or (nfe in repeat_nfes and name in repeat_names):
                    bench.teacher(name, fn(nfe), guidance, s)


# --- the report ------------------------------------------------------------------------------

def _stats(results: dict, group: str, name: str, nfe: int) -> dict | None:
    runs = [r for r in results.values() if r.get("group") == group and r.get("name") == name and r.get("nfe") == nfe]
    if not runs:
        return None
    fds = [r["fd"] for r in runs]
    accs = [r["accuracy"] for r in runs if "accuracy" in r]
    return dict(fd=statistics.mean(fds), fd_sd=statistics.stdev(fds) if len(fds) > 1 else None, runs=len(runs),
                fd0=next((r["fd"] for r in runs if r["seed_set"] == 0), fds[0]),
                acc=statistics.mean(accs) if accs else None,
                spi=statistics.mean(r["seconds_per_image"] for r in runs if "seconds_per_image" in r)
                if any("seconds_per_image" in r for r in runs) else None)


def _fmt_fd(st: dict | None) -> str:
    """Seed set 0's FD (comparable across every row), then the mean ± sd where more seed sets ran."""
    if st is None:
        return "–"
    if st["fd_sd"] is not None:
        return f"{st['fd0']:.3f} ({st['runs']} sets: {st['fd']:.3f} ± {st['fd_sd']:.3f})"
    return f"{st['fd0']:.3f}"


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


def plot_fd_vs_nfe(results: dict, names: list[str], path: Path, group: str = "schedule"):
    import matplotlib.ticker

    with figure(path, "NFE (DPM-Solver++ 2M steps)", "FD (classifier features, seed set 0) ↓") as ax:
        for name in names:
            pts = [(n, _stats(results, group, name, n)) for n in NFES]
            pts = [(n, st["fd0"]) for n, st in pts if st]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(NFES, [str(n) for n in NFES])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def write_report(results: dict, path: Path = REPORT) -> str:
    names = ["karras", "exponential", "normal"] + [f"exp_karras p={p:g}" for p in P_VALUES]
    guidance = results.get("meta|best_guidance", {}).get("guidance")
    n = next((r["n"] for r in results.values() if "n" in r), None)
    lines = ["# Lab report", "",
             "Generated by `python -m direct_distill benchmark` from `lab/results.json`; do not edit by hand.",
             "", f"Teacher: `lab/assets/teacher` (class-conditional latent diffusion on Fashion-MNIST). "
             f"Every row samples the same {n} seeded initial latents and balanced labels "
             f"(100 per class); FD is the Fréchet distance to the 10,000 real test images in the lab "
             "classifier's 128-d feature space, accuracy is the classifier's agreement with the prompt. "
             "FD cells give seed set 0 (the same noise for every row); where more seed sets ran, their mean "
             "± standard deviation follows in brackets.", ""]
    floors = [r for r in results.values() if r.get("group") == "floor"]
    if floors:
        real = [r["fd"] for r in floors if r["name"] == "real train vs test"]
        vae = next((r for r in floors if r["name"] == "VAE reconstruction"), None)
        lines += ["## Floors", "", "| reference | FD | accuracy |", "|---|---|---|"]
        if real:
            sd = f" ± {statistics.stdev(real):.2f}" if len(real) > 1 else ""
            lines.append(f"| {n} real training images | {statistics.mean(real):.2f}{sd} | – |")
        if vae:
            lines.append(f"| the same images through the VAE (encode, decode) | {vae['fd']:.2f} | {vae['accuracy']:.3f} |")
        lines.append("")
    cfg_rows = sorted((r for r in results.values() if r.get("group") == "cfg"), key=lambda r: r["guidance"])
    if cfg_rows:
        lines += [f"## Guidance (DPM++ 2M Karras, {CFG_SWEEP_STEPS} steps)", "",
                  "| guidance | FD | accuracy |", "|---|---|---|"]
        lines += [f"| {r['guidance']:g} | {r['fd']:.2f} | {r['accuracy']:.3f} |" for r in cfg_rows]
        lines += ["", f"Best guidance (lowest FD): **{guidance:g}**, used for every row below.", ""]
    teacher50 = _stats(results, "schedule", "karras", 50)
    if teacher50:
        real = [r["fd"] for r in floors if r["name"] == "real train vs test"]
        floor_txt = f" (real-data floor {statistics.mean(real):.2f})" if real else ""
        lines += ["## Teacher quality", "",
                  f"DPM++ 2M Karras, 50 steps, guidance {guidance:g}, {n} samples: FD **{teacher50['fd']:.2f}**"
                  f"{floor_txt}, class accuracy **{teacher50['acc']:.3f}**.", ""]
    if any(r.get("group") == "schedule" for r in results.values()):
        lines += ["## Schedules (DPM++ 2M)", "", "FD (lower is better):", "",
                  "| schedule | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---|" * len(NFES)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(_fmt_fd(_stats(results, "schedule", name, k)) for k in NFES) + " |")
        lines += ["", "Class accuracy:", "", "| schedule | " + " | ".join(f"NFE {k}" for k in NFES) + " |",
                  "|---|" + "---|" * len(NFES)]
        for name in names:
            cells = [_stats(results, "schedule", name, k) for k in NFES]
            lines.append(f"| {name} | " + " | ".join(f"{c['acc']:.3f}" if c else "–" for c in cells) + " |")
        lines += ["", "Seconds per image (CPU, batch 500, CFG doubles the batch):", "",
                  "| schedule | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---|" * len(NFES)]
        # The cost depends on the NFE only; the karras rows stand for every schedule.
        cells = [_stats(results, "schedule", "karras", k) for k in NFES]
        lines.append("| any schedule | " + " | ".join(f"{c['spi'] * 1e3:.1f} ms" if c else "–" for c in cells) + " |")
        lines += ["", "![FD vs NFE](plots/fd_vs_nfe.png)", ""]
        plot_fd_vs_nfe(results, names, path.parent / "plots" / "fd_vs_nfe.png")
        lines += schedule_verdict(results)
    lines += shortcut_section(results)
    lines += student_section(results, path.parent / "plots")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def shortcut_section(results: dict) -> list[str]:
    rows = [(name, _stats(results, "shortcut", name, k + 1)) for name, (_, k) in SHORTCUT_RUNS.items()]
    if not any(st for _, st in rows):
        return []
    from ..models.io import read_safetensors
    from . import SHORTCUT_PATH

    lines = ["## The NAFNet shortcut (K teacher steps + 1 shortcut call)", ""]
    if SHORTCUT_PATH.is_file():
        meta = read_safetensors(SHORTCUT_PATH)[1]
        extra = json.loads(meta.get("extra", "{}"))
        psnr = extra.get("heldout_psnr", {})
        if psnr:
            lines += ["Held-out PSNR against the 20-step teacher's final latent (latent space, peak = the range "
                      "of the held-out targets; `input` is x_t itself):", "", "| held-out pairs | " +
                      " | ".join(k for k in psnr) + " |", "|---|" + "---|" * len(psnr)]
            keys = sorted({t for v in psnr.values() for t in v})
            for key in keys:
                lines.append(f"| {key} | " + " | ".join(f"{v.get(key, float('nan')):.2f} dB" for v in psnr.values()) + " |")
            lines.append("")
    lines += ["| run | NFE | FD | accuracy | teacher exp_karras at the same NFE: FD | accuracy |",
              "|---|---|---|---|---|---|"]
    for name, st in rows:
        if not st:
            continue
        nfe = SHORTCUT_RUNS[name][1] + 1
        ref = _stats(results, "schedule", "exp_karras p=1", nfe)
        lines.append(f"| {name} | {nfe} | {_fmt_fd(st)} | {st['acc']:.3f} | {_fmt_fd(ref)} | "
                     f"{ref['acc']:.3f} |" if ref else f"| {name} | {nfe} | {_fmt_fd(st)} | {st['acc']:.3f} | – | – |")
    ref20 = _stats(results, "schedule", "exp_karras p=1", 20)
    if ref20:
        lines.append(f"| teacher, 20 steps | 20 | {_fmt_fd(ref20)} | {ref20['acc']:.3f} | | |")
        twelve = _stats(results, "shortcut", "12+1", 13)
        if twelve:
            lines += ["", f"12+1 FD is {100 * (twelve['fd'] / ref20['fd'] - 1):+.1f} % against the teacher's "
                      "20-step FD (goal: within 5 %)."]
        seven, eight = _stats(results, "shortcut", "7+1", 8), _stats(results, "schedule", "exp_karras p=1", 8)
        if seven and eight:
            lines.append(f"7+1 FD {seven['fd']:.2f} against the teacher's 8-step {eight['fd']:.2f} "
                         f"({'better' if seven['fd'] < eight['fd'] else 'worse'}; goal: better).")
    return lines + [""]


def student_section(results: dict, plots: Path = PLOTS) -> list[str]:
    names = sorted({r["name"] for r in results.values() if r.get("group") == "student"})
    if not names:
        return []
    cols = sorted(set(STUDENT_NFES) | {20, 50})
    lines = ["## LoRA students (FD / class accuracy)", "",
             "| model | " + " | ".join(f"NFE {k}" for k in cols) + " |", "|---|" + "---|" * len(cols)]

    def cell(st):
        return f"{_fmt_fd(st)} / {st['acc']:.3f}" if st else "–"

    for name in names:
        label = name if name == ONE_STEP_START else f"student `{name}`"
        lines.append(f"| {label} | " + " | ".join(cell(_stats(results, "student", name, k)) for k in cols) + " |")
    lines.append("| teacher, exp_karras DPM++ 2M | " +
                 " | ".join(cell(_stats(results, "schedule", "exp_karras p=1", k)) for k in cols) + " |")
    ref20 = _stats(results, "schedule", "exp_karras p=1", 20)
    if ref20:
        lines += ["", f"Against the teacher's 20-NFE FD ({ref20['fd']:.3f}); the goals are within 25 % at NFE 2 and "
                  "within 10 % at NFE 4:", ""]
        for name in (n for n in names if n != ONE_STEP_START):
            for k, goal in ((2, 25), (4, 10)):
                st = _stats(results, "student", name, k)
                if st:
                    gap = 100 * (st["fd"] / ref20["fd"] - 1)
                    lines.append(f"- `{name}` at NFE {k}: {gap:+.0f} % ({'met' if gap <= goal else 'missed'})")
    return lines + [""] + cost_section(results) + curve_section(results, plots)


def cost_section(results: dict) -> list[str]:
    """Each student file's recorded training seconds next to the teacher's training cost."""
    metas = sorted((r for r in results.values() if r.get("group") == "student_meta"), key=lambda r: r["file"])
    teacher = results.get("cost|teacher")
    if not metas:
        return []
    lines = ["## What distillation costs", "",
             "Seconds in the training loop, recorded in each student file (CPU, one thread unless noted). "
             + (f"The teacher's training, timed on this machine with the same code: VAE "
                f"{teacher['vae_seconds_per_step']:.3f} s/step x {teacher['vae_steps']} + UNet "
                f"{teacher['unet_seconds_per_step']:.3f} s/step x {teacher['unet_steps']} (batch "
                f"{teacher['unet_batch']}) = **{teacher['seconds'] / 60:.1f} min** on {teacher['threads']} thread(s)."
                if teacher else "The teacher's cost is not measured yet (`--groups costs`)."), "",
             "| student file | NFE | training | share of the teacher's training |", "|---|---|---|---|"]
    for r in metas:
        sec = r.get("train_seconds")
        share = f"{100 * sec / teacher['seconds']:.0f} %" if sec is not None and teacher else "–"
        threads = f" ({r['threads']} threads)" if r.get("threads") not in (None, 1) else ""
        lines.append(f"| `{r['file']}` | {', '.join(map(str, r['nfes']))} | "
                     f"{f'{sec / 60:.1f} min' if sec is not None else 'not recorded'}{threads} | {share} |")
    return lines + [""]


def curve_section(results: dict, plots: Path = PLOTS) -> list[str]:
    """FD along training of the students that were evaluated as they trained; for runs of one method (DisBack
    with and without backtracking), the steps each needs to reach the best FD the slower of them reached."""
    metas = {r["name"]: r for r in results.values() if r.get("group") == "student_meta" and r.get("evaluations")}
    if not metas:
        return []
    runs = {name: r["evaluations"] for name, r in metas.items()}
    start = _stats(results, "student", ONE_STEP_START, 1)
    plot_curves(runs, plots / "one_step_curves.png", start=start["fd0"] if start else None)
    lines = ["## One-step students along training", "",
             "FD of 1,000 samples of the student at regular steps (its own seeds, guidance 1). DisBack's steps are "
             "those of stage two; with backtracking, stage one (the degradation path) comes before them. The last "
             "column is the step whose generator the student file holds (the lowest-FD one for runs made since "
             "the training keeps it, the last one before).", "",
             "![FD along training](plots/one_step_curves.png)", "",
             "| run | first FD (step) | best FD (step) | last FD (step) | file holds step |", "|---|---|---|---|---|"]
    for name, evals in sorted(runs.items()):
        best = min(evals, key=lambda e: e[1]["fd"])
        held = (metas[name].get("selected") or {}).get("step", evals[-1][0])
        lines.append(f"| `{name}` | {evals[0][1]['fd']:.2f} ({evals[0][0]}) | {best[1]['fd']:.2f} ({best[0]}) | "
                     f"{evals[-1][1]['fd']:.2f} ({evals[-1][0]}) | {held} |")
    by_method: dict[str, list[str]] = {}
    for name, r in metas.items():
        by_method.setdefault(r.get("method", name), []).append(name)
    for method, names in sorted(by_method.items()):
        if len(names) < 2:
            continue
        target = max(min(e[1]["fd"] for e in runs[n]) for n in names)
        lines += ["", f"`{method}`: steps to reach FD {target:.2f} (the higher of the runs' best FDs):", "",
                  "| run | steps |", "|---|---|"]
        for name in sorted(names):
            reached = next((step for step, sc in runs[name] if sc["fd"] <= target), None)
            lines.append(f"| `{name}` | {reached if reached is not None else 'not reached'} |")
    return lines + [""]


def plot_curves(runs: dict, path: Path, start: float | None = None):
    with figure(path, "training step", "FD (1,000 samples) ↓") as ax:
        for name, evals in sorted(runs.items()):
            ax.plot([e[0] for e in evals], [e[1]["fd"] for e in evals], marker="o", label=name)
        if start is not None:
            ax.axhline(start, color="grey", linestyle="--", label="before training (teacher, one call at t=999)")


def paired_difference(results: dict, a: str, b: str, nfe: int) -> tuple[float, float | None, int]:
    """Mean and sd of FD(a) - FD(b) over seed sets both ran (same seeds: a paired comparison)."""
    def by_seed(name):
        return {r["seed_set"]: r["fd"] for r in results.values()
                if r.get("group") == "schedule" and r.get("name") == name and r.get("nfe") == nfe}
    fa, fb = by_seed(a), by_seed(b)
    diffs = [fa[s] - fb[s] for s in sorted(set(fa) & set(fb))]
    if not diffs:
        return float("nan"), None, 0
    return statistics.mean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else None), len(diffs)


def schedule_verdict(results: dict) -> list[str]:
    lines = ["### Does exp_karras beat karras?", "",
             "Paired over the same seed sets: FD(exp_karras p=1) − FD(karras); negative means exp_karras is better.", "",
             "| NFE | difference | seed sets | verdict |", "|---|---|---|---|"]
    for nfe in NFES:
        mean, sd, k = paired_difference(results, "exp_karras p=1", "karras", nfe)
        if k == 0:
            continue
        if sd is not None and abs(mean) > 2 * sd / k ** 0.5:
            verdict = "exp_karras better" if mean < 0 else "karras better"
        elif sd is None:
            verdict = "exp_karras better (one seed set)" if mean < 0 else "karras better (one seed set)"
        else:
            verdict = "no significant difference"
        sd_txt = f" ± {sd:.3f}" if sd is not None else ""
        lines.append(f"| {nfe} | {mean:+.3f}{sd_txt} | {k} | {verdict} |")
    best = {}
    for nfe in NFES:
        cands = [(st["fd"], f"p={p:g}") for p in P_VALUES
                 if (st := _stats(results, "schedule", f"exp_karras p={p:g}", nfe))]
        if cands:
            best[nfe] = min(cands)[1]
    if best:
        lines += ["", "Best exp_karras p per NFE: " + ", ".join(f"NFE {k}: {v}" for k, v in best.items()) + "."]
    return lines + [""]


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
        print(write_report(json.loads(RESULTS.read_text())))
        return
    torch.manual_seed(0)
    bench = Bench(args.samples)
    groups = set(args.groups.split(","))
    if "floors" in groups:
        bench.floors(args.repeats)
    guidance = args.guidance or bench.results.get("meta|best_guidance", {}).get("guidance")
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
