"""The lab report's arithmetic: paired differences over seed sets, verdicts, tables from results."""

import pytest

from direct_distill.lab.benchmark import (NFES, Evaluation, Results, Run, StudentFile, TeacherCost,
                                          write_report)


def fake_results(karras_fd, exp_fd):
    """Results as the benchmark records them, from {nfe: [FD per seed set]} per schedule."""
    results = Results()
    for name, table in (("karras", karras_fd), ("exp_karras p=1", exp_fd)):
        for nfe, fds in table.items():
            for s, fd in enumerate(fds):
                results.runs.append(Run("schedule", name, nfe, s, n=1000, fd=fd, accuracy=0.9, seconds_per_image=0.01))
    return results


def test_paired_difference_uses_matching_seed_sets():
    res = fake_results({20: [5.0, 6.0, 7.0]}, {20: [4.0, 5.5, 6.0]})
    mean, sd, k = res.paired_difference("exp_karras p=1", "karras", 20)
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
    res.teacher_cost = TeacherCost(vae_seconds_per_step=0.5, vae_steps=2000, vae_batch=64, unet_seconds_per_step=0.6,
                                   unet_steps=4500, unet_batch=128, seconds=3700.0, threads=1)
    for name, nfe, fd in (("sfd", 4, 1.05), ("progressive", 1, 3.0), ("progressive", 2, 1.2)):
        res.runs.append(Run("student", name, nfe, 0, n=1000, fd=fd, accuracy=0.9, seconds_per_image=0.001))
    meta = dict(method="disback", nfes=[1], threads=1, device="cpu")
    res.students += [
        StudentFile(**{**meta, "method": "sfd", "nfes": [2, 4]}, name="sfd", file="sfd.safetensors", train_seconds=370.0),
        StudentFile(**{**meta, "method": "progressive"}, name="progressive", file="progressive_nfe2.safetensors",
                    train_seconds=None),
        # With backtracking: FD 4.0 (the plain run's best) at step 400; the plain run gets there at step 1000.
        StudentFile(**meta, name="disback", file="disback.safetensors", train_seconds=900.0,
                    selected=Evaluation(400, 3.9),
                    evaluations=[Evaluation(200, 5.0), Evaluation(400, 3.9), Evaluation(600, 3.5)]),
        StudentFile(**meta, name="plain", file="plain.safetensors", train_seconds=800.0,
                    evaluations=[Evaluation(200, 6.0), Evaluation(600, 4.5), Evaluation(1000, 4.0)]),
    ]
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
