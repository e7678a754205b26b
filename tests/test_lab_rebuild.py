"""`python -m direct_distill rebuild`: the README's commands in an order their inputs allow, at most --jobs at a
time, a failure stopping what has not started, and what a retrained teacher invalidates set aside, not mixed in."""

import json
import os
import stat

import pytest
from test_lab_preset import readme_lab_commands

from direct_distill.lab import rebuild
from direct_distill.lab.rebuild import DISTILL_COMMANDS, Step, plan, run, set_aside_other_teacher
from direct_distill.training.runner import SETTINGS_FILE, TEACHER_CONTENT


def test_the_rebuild_runs_exactly_the_commands_the_readme_gives_for_the_committed_files():
    assert [list(c) for c in DISTILL_COMMANDS] == readme_lab_commands()


@pytest.mark.parametrize("perceptual", [False, True])
def test_the_plan_puts_every_step_after_what_it_reads(perceptual):
    steps = plan(perceptual=perceptual, classifier=True)
    position = {s.name: i for i, s in enumerate(steps)}
    assert len(position) == len(steps), "step names are unique"
    for s in steps:
        assert all(position[a] < position[s.name] for a in s.after), s.name
    assert ("teacher-features" in position) == perceptual
    if perceptual:
        assert "teacher-features" in next(s for s in steps if s.name == "teacher-vae").after
    students = [s for s in steps if s.argv[0] == "distill"]
    assert len(students) == len(DISTILL_COMMANDS) and all(s.after == ("teacher-export",) for s in students)
    assert {s.name for s in students} <= set(steps[-1].after) and steps[-1].name == "benchmark-students"
    assert steps[-1].alone and not any(s.alone for s in steps[:-1])  # sampling alone; training on one thread each
    assert "classifier" in next(s for s in steps if s.name == "benchmark-teacher").after
    assert "classifier" not in {s.name for s in plan(perceptual=perceptual, classifier=False)}
    work = {s.name: s.work for s in students}
    assert work["progressive"] == rebuild.ROOT / "lab" / "work" / "progressive"
    assert work["sfd_1step"] == rebuild.ROOT / "lab" / "work" / "sfd_1step"


@pytest.fixture
def fake_python(tmp_path):
    """Stands in for `python -m direct_distill <step>`: logs its start and end, fails for a step named 'fail'."""
    script = tmp_path / "python"
    script.write_text('#!/bin/sh\necho "start $3 $OMP_NUM_THREADS" >> "$EVENTS"\nsleep 0.8\necho "step $3 output"\n'
                      'echo "end $3" >> "$EVENTS"\n[ "$3" != fail ]\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    events = tmp_path / "events"
    os.environ["EVENTS"] = str(events)
    yield str(script), events
    del os.environ["EVENTS"]


def _events(path):
    return [line.split() for line in path.read_text().splitlines()]


def test_steps_run_after_their_inputs_at_most_jobs_at_a_time_on_one_thread_each(tmp_path, fake_python):
    python, events = fake_python
    steps = [Step("a", ("a",)), Step("b", ("b",)), Step("c", ("c",), ("a",)), Step("d", ("d",), ("b", "c"))]
    assert run(steps, jobs=2, logs=tmp_path / "logs", python=python, prepare=lambda s: s.argv, poll=0.05) == []
    seen, running, most = [], set(), 0
    for kind, name, *threads in _events(events):
        if kind == "start":
            assert threads == ["1"]
            running.add(name)
            most = max(most, len(running))
        else:
            running.discard(name)
        seen.append((kind, name))
    assert most == 2
    assert seen.index(("end", "a")) < seen.index(("start", "c"))
    assert seen.index(("end", "c")) < seen.index(("start", "d")) and seen.index(("end", "b")) < seen.index(("start", "d"))
    assert (tmp_path / "logs" / "d.log").read_text() == "step d output\n"


def test_a_step_marked_alone_waits_for_the_others_and_runs_by_itself_on_every_jobs_thread(tmp_path, fake_python):
    python, events = fake_python
    steps = [Step("a", ("a",)), Step("b", ("b",)), Step("last", ("last",), ("a",), alone=True), Step("d", ("d",))]
    assert run(steps, jobs=3, logs=tmp_path / "logs", python=python, prepare=lambda s: s.argv, poll=0.05) == []
    seen = [tuple(e) for e in _events(events)]
    # a, b and d side by side (d listed after 'last' starts at once: 'last' is not ready yet), then 'last' alone
    assert sorted(seen[:3]) == [("start", "a", "1"), ("start", "b", "1"), ("start", "d", "1")]
    assert seen[-2:] == [("start", "last", "3"), ("end", "last")]


def test_a_failed_step_stops_the_steps_not_started_and_is_named(tmp_path, fake_python, capsys):
    python, events = fake_python
    steps = [Step("fail", ("fail",)), Step("slow", ("slow",)), Step("next", ("next",), ("slow",))]
    assert run(steps, jobs=2, logs=tmp_path / "logs", python=python, prepare=lambda s: s.argv, poll=0.05) == ["fail"]
    seen = [tuple(e[:2]) for e in _events(events)]  # the two run side by side, in either order; 'next' never starts
    assert sorted(seen[:2]) == [("start", "fail"), ("start", "slow")]
    assert sorted(seen[2:]) == [("end", "fail"), ("end", "slow")]
    assert "FAILED fail (exit 1 after" in capsys.readouterr().out
    with pytest.raises(ValueError, match="step x follows unknown step"):
        run([Step("x", ("x",), ("y",))], jobs=1, logs=tmp_path / "logs", python=python)
    with pytest.raises(ValueError, match="steps x, y wait on each other"):
        run([Step("x", ("x",), ("y",)), Step("y", ("y",), ("x",))], jobs=1, logs=tmp_path / "logs", python=python)


def test_a_work_folder_of_another_teacher_is_moved_aside_never_deleted_or_mixed(tmp_path):
    work = tmp_path / "progressive"
    assert set_aside_other_teacher(work, "new") is None  # nothing there yet
    work.mkdir()
    (work / "checkpoint.safetensors").write_bytes(b"old run")
    assert set_aside_other_teacher(work, "new") is None  # no settings recorded: the run itself decides
    (work / SETTINGS_FILE).write_text(json.dumps({"method": "progressive", TEACHER_CONTENT: "new"}))
    assert set_aside_other_teacher(work, "new") is None and work.is_dir()  # this teacher's run: resumed
    (work / SETTINGS_FILE).write_text(json.dumps({"method": "progressive", TEACHER_CONTENT: "old"}))
    assert set_aside_other_teacher(work, "new") == tmp_path / "progressive.other-teacher-1"
    assert not work.exists()
    assert (tmp_path / "progressive.other-teacher-1" / "checkpoint.safetensors").read_bytes() == b"old run"
    work.mkdir()
    (work / SETTINGS_FILE).write_text(json.dumps({TEACHER_CONTENT: "older"}))
    assert set_aside_other_teacher(work, "new") == tmp_path / "progressive.other-teacher-2"


def test_the_report_starts_anew_only_when_its_rows_are_another_teachers(tmp_path, monkeypatch, capsys):
    from direct_distill.lab import benchmark

    results = tmp_path / "results.json"
    monkeypatch.setattr(benchmark, "RESULTS", results)
    monkeypatch.setattr(benchmark, "teacher_fingerprint", lambda folder=None: "this teacher")
    step = Step("benchmark-teacher", ("benchmark", "--groups", "floors,cfg,schedules"))
    assert rebuild.prepare(step) == step.argv  # no results yet
    results.write_text(json.dumps(benchmark.Results(teacher="this teacher").to_json()))
    assert rebuild.prepare(step) == step.argv
    results.write_text(json.dumps(benchmark.Results(teacher="another teacher").to_json()))
    assert rebuild.prepare(step) == (*step.argv, "--fresh")
    assert "holds another teacher's rows" in capsys.readouterr().out


def test_the_command_checks_jobs_and_lists_its_steps(capsys):
    with pytest.raises(SystemExit):
        rebuild.main(["--jobs", "0"])
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err
    assert rebuild.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "teacher-export             python -m direct_distill teacher export   (after teacher-unet, teacher-decoder)" \
        in out
    assert out.strip().splitlines()[-1].startswith("benchmark-students ")
