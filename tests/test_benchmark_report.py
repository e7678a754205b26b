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
