"""The lab report's arithmetic: paired differences over seed sets, verdicts, tables from results."""

import pytest

from direct_distill.lab.benchmark import NFES, paired_difference, write_report


def fake_results(karras_fd, exp_fd):
    """Results as the benchmark records them: (name, nfe, seed_set) -> FD."""
    results = {}
    for name, table in (("karras", karras_fd), ("exp_karras p=1", exp_fd)):
        for nfe, fds in table.items():
            for s, fd in enumerate(fds):
                results[f"schedule|{name}|{nfe}|{s}"] = dict(group="schedule", name=name, nfe=nfe, seed_set=s,
                                                            n=1000, fd=fd, accuracy=0.9, seconds_per_image=0.01)
    return results


def test_paired_difference_uses_matching_seed_sets():
    res = fake_results({20: [5.0, 6.0, 7.0]}, {20: [4.0, 5.5, 6.0]})
    mean, sd, k = paired_difference(res, "exp_karras p=1", "karras", 20)
    assert k == 3 and mean == pytest.approx((-1.0 - 0.5 - 1.0) / 3)
    assert sd == pytest.approx(0.288675, rel=1e-4)


def test_report_verdicts_follow_the_spread(tmp_path):
    # NFE 8: a consistent gain; NFE 20: noise around zero.
    res = fake_results({8: [10.0, 11.0, 12.0], 20: [5.0, 6.0, 7.0]},
                       {8: [8.0, 9.1, 9.9], 20: [5.3, 5.8, 7.1]})
    text = write_report(res, tmp_path / "REPORT.md")
    row8 = next(line for line in text.splitlines() if line.startswith("| 8 |"))
    row20 = next(line for line in text.splitlines() if line.startswith("| 20 |"))
    assert "exp_karras better" in row8
    assert "no significant difference" in row20
    assert (tmp_path / "plots" / "fd_vs_nfe.png").is_file()
    assert "10.00" not in text.split("## Schedules")[0], "no schedule numbers before the schedules table"
    assert f"NFE {NFES[-1]}" in text


def test_student_costs_and_training_curves(tmp_path):
    res = fake_results({20: [1.0]}, {1: [5.0], 20: [1.0]})
    res["cost|teacher"] = dict(group="cost", vae_seconds_per_step=0.5, vae_steps=2000, vae_batch=64,
                               unet_seconds_per_step=0.6, unet_steps=4500, unet_batch=128, seconds=3700.0, threads=1)
    for name, nfe, fd in (("sfd", 4, 1.05), ("progressive", 1, 3.0), ("progressive", 2, 1.2)):
        res[f"student|{name}|{nfe}|0"] = dict(group="student", name=name, nfe=nfe, seed_set=0, n=1000, fd=fd,
                                             accuracy=0.9, seconds_per_image=0.001)
    meta = dict(group="student_meta", method="disback", nfes=[1], threads=1, device="cpu", training={})
    res["student_meta|sfd"] = {**meta, "name": "sfd", "file": "sfd.safetensors", "nfes": [2, 4],
                               "train_seconds": 370.0, "evaluations": []}
    res["student_meta|progressive_nfe2"] = {**meta, "name": "progressive", "file": "progressive_nfe2.safetensors",
                                            "train_seconds": None, "evaluations": []}
    # With backtracking: FD 4.0 (the plain run's best) at step 400; the plain run gets there at step 1000.
    res["student_meta|disback"] = {**meta, "name": "disback", "file": "disback.safetensors", "train_seconds": 900.0,
                                   "selected": {"step": 400, "fd": 3.9},
                                   "evaluations": [[200, {"fd": 5.0}], [400, {"fd": 3.9}], [600, {"fd": 3.5}]]}
    res["student_meta|plain"] = {**meta, "name": "plain", "file": "plain.safetensors", "train_seconds": 800.0,
                                 "evaluations": [[200, {"fd": 6.0}], [600, {"fd": 4.5}], [1000, {"fd": 4.0}]]}
    text = write_report(res, tmp_path / "REPORT.md")
    lines = text.splitlines()
    assert "= **61.7 min**" in text
    assert "| `sfd.safetensors` | 2, 4 | 6.2 min | 10 % |" in lines
    assert "| `progressive_nfe2.safetensors` | 1 | not recorded | – |" in lines
    assert "`disback`: steps to reach FD 4.00 (the higher of the runs' best FDs):" in lines
    assert "| `disback` | 400 |" in lines and "| `plain` | 1000 |" in lines
    assert "| `disback` | 5.00 (200) | 3.50 (600) | 3.50 (600) | 400 |" in lines  # the file holds the selected step
    assert "| `plain` | 6.00 (200) | 4.00 (1000) | 4.00 (1000) | 1000 |" in lines
    assert "- `progressive` at NFE 2: +20 % (met)" in lines
    assert (tmp_path / "plots" / "one_step_curves.png").is_file()
    row = next(line for line in lines if line.startswith("| student `progressive` |"))
    assert "3.000 / 0.900" in row and "1.200 / 0.900" in row  # both rounds' files share one row
