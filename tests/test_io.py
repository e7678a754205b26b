"""Weight files on disk: ordinary permissions, nothing left behind by a killed save, unwritable places found early."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from direct_distill.models.io import (PARTIAL_SUFFIX, FolderInUse, atomic_save_file, atomic_write_text,
                                      check_writable, check_writable_folder, hold_folder, read_safetensors)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_saved_files_get_ordinary_permissions(tmp_path, umask_022):
    path = atomic_save_file({"w": torch.ones(3)}, tmp_path / "model.safetensors", {"kind": "test"})
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    atomic_save_file({"w": torch.zeros(3)}, path)   # replacing keeps them too
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_replaced_file_keeps_its_own_permissions(tmp_path, umask_022):
    # stamping a private LoRA in place must not make it world-readable
    path = atomic_save_file({"w": torch.ones(3)}, tmp_path / "private.safetensors")
    path.chmod(0o640)
    atomic_save_file({"w": torch.zeros(3)}, path)
    atomic_write_text(tmp_path / "record.json", "{}").chmod(0o600)
    atomic_write_text(tmp_path / "record.json", "[]")
    assert (oct(path.stat().st_mode & 0o777), oct((tmp_path / "record.json").stat().st_mode & 0o777)) == \
        (oct(0o640), oct(0o600))


def test_a_save_that_fails_to_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    import direct_distill.models.io as io
    from safetensors import SafetensorError

    path = atomic_save_file({"w": torch.ones(3)}, tmp_path / "model.safetensors")

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(io, "save_file", disk_full)
    with pytest.raises(OSError, match=r"model.safetensors: could not be written \(.*No space left.*\); the previous"):
        atomic_save_file({"w": torch.zeros(3)}, path)
    assert torch.equal(read_safetensors(path)[0]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_killed_save_leaves_nothing_after_the_next_save(tmp_path, umask_022):
    """A save killed outright (SIGKILL, after the bytes are written, before the rename) leaves its hidden
    temporary folder; the next save to the same file removes it, and the previous file was never touched."""
    path = tmp_path / "state.safetensors"
    atomic_save_file({"w": torch.zeros(4)}, path)
    script = textwrap.dedent(f"""
        import time, torch
        import direct_distill.models.io as io
        write = io.save_file
        def write_then_hang(tensors, filename, metadata=None):
            write(tensors, filename, metadata=metadata)
            print("written", flush=True)
            time.sleep(60)
        io.save_file = write_then_hang
        io.atomic_save_file({{"w": torch.ones(1_000_000)}}, {str(path)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".")
    assert sum(f.stat().st_size for f in leftovers[0].rglob("*")) > 4_000_000
    assert torch.equal(read_safetensors(path)[0]["w"], torch.zeros(4))
    atomic_save_file({"w": torch.ones(2)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]


def test_a_running_save_is_left_alone(tmp_path):
    """The temporary folder of a save still in progress in another process is not another save's to remove."""
    path = tmp_path / "model.safetensors"
    busy = tmp_path / f".{path.name}.{os.getppid()}.abc{PARTIAL_SUFFIX}"
    busy.mkdir()
    atomic_save_file({"w": torch.ones(2)}, path)
    assert busy.is_dir()


def test_a_save_onto_a_folder_names_the_folder_and_writes_nothing(tmp_path):
    folder = tmp_path / "students"
    (folder / "kept").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=f"^{folder}: is a folder, a file name is needed; nothing was written"):
        atomic_save_file({"w": torch.ones(2)}, folder)
    with pytest.raises(IsADirectoryError, match=f"^{folder}: is a folder"):
        atomic_write_text(folder, "{}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept", "students"]


def test_unwritable_places_are_named_before_work_starts(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(PermissionError, match=r"--out .*file.txt/student.safetensors: cannot write there"):
        check_writable(tmp_path / "file.txt" / "student.safetensors", "--out")
    with pytest.raises(PermissionError, match="--work .*file.txt/work: cannot write there"):
        check_writable_folder(tmp_path / "file.txt" / "work", "--work")
    with pytest.raises(PermissionError, match="is a folder, a file name is needed"):
        check_writable(tmp_path, "--out")
    assert check_writable(tmp_path / "new" / "student.safetensors") == tmp_path / "new" / "student.safetensors"
    assert check_writable_folder(tmp_path / "work").is_dir()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file.txt", "new", "work"]   # no probe left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_unwritable(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="--out .*ro/x.safetensors: cannot write there"):
            check_writable(folder / "x.safetensors", "--out")
    finally:
        folder.chmod(0o700)


def test_a_held_folder_refuses_a_second_holder_until_released(tmp_path):
    with hold_folder(tmp_path / "work"):
        with pytest.raises(FolderInUse, match=f"work folder {tmp_path / 'work'} is in use by another run "
                                              fr"\(pid {os.getpid()}\); wait for it to end, or give another folder"):
            with hold_folder(tmp_path / "work"):
                pass
        with hold_folder(tmp_path / "work", hold=False):  # another process of the same run
            pass
    with hold_folder(tmp_path / "work"):  # released with the run
        pass


def test_a_link_is_written_through_to_the_file_it_leads_to(tmp_path):
    """Shared model folders and the Hugging Face cache keep files as links: the link stays, its target is replaced."""
    (tmp_path / "disk").mkdir()
    target = tmp_path / "disk" / "student é.safetensors"
    atomic_save_file({"w": torch.zeros(2)}, target)
    link = tmp_path / "student.safetensors"
    link.symlink_to(target)
    assert atomic_save_file({"w": torch.ones(2)}, link) == link
    assert link.is_symlink() and torch.equal(read_safetensors(target)[0]["w"], torch.ones(2))
    record = tmp_path / "record.json"
    record.symlink_to(tmp_path / "disk" / "record.json")
    atomic_write_text(record, "{}")
    assert record.is_symlink() and (tmp_path / "disk" / "record.json").read_text() == "{}"


def test_json_records_are_written_whole_with_ordinary_permissions(tmp_path, umask_022):
    path = atomic_write_text(tmp_path / "work" / "settings.json", '{"lr": 0.1}')
    assert path.read_text() == '{"lr": 0.1}' and oct(path.stat().st_mode & 0o777) == oct(0o644)
    atomic_write_text(path, '{"lr": 0.2}')
    assert path.read_text() == '{"lr": 0.2}' and [p.name for p in path.parent.iterdir()] == ["settings.json"]


def test_files_sha256_digests_the_bytes_of_the_files_in_the_order_given(tmp_path):
    import hashlib

    from direct_distill.models.io import files_sha256

    a, b = tmp_path / "a.safetensors", tmp_path / "b.json"
    a.write_bytes(b"\x00weights" * 1000)
    b.write_bytes(b'{"scaling_factor": 1.5}')
    assert files_sha256(a, b) == hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()
    assert files_sha256(b, a) != files_sha256(a, b)
    assert files_sha256() == hashlib.sha256().hexdigest()
