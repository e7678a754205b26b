"""Safetensors reading and atomic writing: the only way this project touches weight files."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


PARTIAL_SUFFIX = ".partial"
# the dtypes this project stores weights in
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FileFormatError(ValueError):
    """A weight file is missing, malformed, or made for something else."""


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``tensors`` to ``path`` as safetensors via a private temporary folder and a rename.

    A crash mid-write leaves the previous file (if any) untouched; the temporary folder of a save that was
    killed outright is removed by the next save to the same path. A new file gets ordinary permissions (0666
    less the umask), a replaced one keeps its own. Metadata values that are not strings are stored as JSON. A
    symbolic link is written through: the file it leads to is replaced, the link stays (shared model folders).
    """
    given, path = _target(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _remove_stale_partials(path)
    # safetensors writes through a hidden temporary file of its own beside the target; inside our folder, a
    # killed save leaves it where the next save finds it.
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=path.parent))
    try:
        tmp = partial / path.name
        try:
            save_file(tensors, tmp, metadata=meta)
        except SafetensorError as err:  # its I/O errors (a full disk) as what they are
            raise OSError(f"{path}: could not be written ({err}); the previous file, if any, is untouched") from None
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return given


def _target(path: str | os.PathLike) -> tuple[Path, Path]:
    """(``path`` as given, the file a save writes: through a symbolic link), its folder created; a folder at
    ``path`` is named as the problem before anything is written (not the temporary file the rename would fail on)."""
    given, path = Path(path), Path(os.path.realpath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{given}: is a folder, a file name is needed; nothing was written")
    path.parent.mkdir(parents=True, exist_ok=True)
    return given, path


def tensor_problem(tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...] | None = WEIGHT_DTYPES) -> str | None:
    """Why ``tensor`` cannot be trained weights or latents (a dtype outside ``dtypes``, any non-float one without
    them; non-finite values), or None."""
    if not tensor.is_floating_point() or (dtypes is not None and tensor.dtype not in dtypes):
        return f"dtype {tensor.dtype}"
    return None if bool(torch.isfinite(tensor).all()) else "non-finite values"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file beside it and a rename, with ordinary permissions
    (or those of the file it replaces): the small JSON records that sit beside the weights. A symbolic link is
    written through."""
    given, path = _target(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return given


def files_sha256(*paths: str | os.PathLike) -> str:
    """SHA-256 (hex) over the bytes of ``paths`` in the order given, read in chunks: which weights or inputs a
    record or a checkpoint refers to."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def ordinary_permissions(folder: str | os.PathLike) -> Path:
    """Give the files of a folder a library just wrote (diffusers' ``save_pretrained``, whose safetensors files
    come out 0600 from their private temporary file) the permissions an ordinary new file gets."""
    folder = Path(folder)
    mode = _ordinary_mode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
    return folder


def _mode_for(path: Path) -> int:
    """The permissions of the file ``path`` replaces, or an ordinary new file's."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return _ordinary_mode()


def _ordinary_mode() -> int:
    """0666 less the umask: what an ordinary new file gets (temporary files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _remove_stale_partials(path: Path) -> None:
    """Remove the temporary folders of earlier saves to ``path`` whose process no longer runs."""
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"):
        pid = partial.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Make sure a file can be written at ``path`` (its folder is created), by writing and removing a probe
    file there; raises PermissionError naming ``what`` and the path otherwise. Used before long work starts."""
    path = Path(path)
    if path.is_dir():
        raise PermissionError(f"{what} {path}: is a folder, a file name is needed")
    _check_folder(path.parent, what, path)
    return path


def readable(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole safetensors file (its header reads; a file cut short by a kill or a full disk
    is not): a stage's computed file is computed again when it is not."""
    try:
        read_safetensors_header(path)
        return True
    except FileFormatError:
        return False


def is_direct_distill_file(metadata: dict[str, str]) -> bool:
    """Whether a safetensors file's metadata names one of this project's formats (a student, a shortcut, ...)."""
    return metadata.get("format", "").strip('"').startswith("direct_distill.")


def check_replaceable(path: str | os.PathLike, inputs: dict[str, str | os.PathLike | None],
                      kind: str | None = None) -> None:
    """Refuse (ValueError) to write ``path`` over something a user would lose: one of the run's ``inputs`` (``{flag:
    path}``; a file, or a file inside an input folder), an existing file that is not one of this project's (a
    checkpoint, someone's LoRA), or one of another of its formats than ``kind``, the one written (a student where
    latents are written). An existing file of that format is replaced, as a re-run expects."""
    path = Path(path)
    target = os.path.realpath(path)
    for flag, source in inputs.items():
        if source is None:
            continue
        source = os.path.realpath(source)
        if target == source or target.startswith(source.rstrip(os.sep) + os.sep):
            raise ValueError(f"{path} is {'in ' if target != source else ''}what {flag} reads; write elsewhere")
    if path.is_file():
        try:
            _, metadata = read_safetensors_header(path)
        except FileFormatError:
            metadata = {}
        if not is_direct_distill_file(metadata):
            raise ValueError(f"{path} exists and is not a file of this project (a checkpoint, another LoRA?): give "
                             "another name, or move it away first")
        held = metadata["format"].strip('"')
        if kind is not None and held != kind:
            raise ValueError(f"{path} exists and holds a {held.split('.', 1)[1]} file, this run writes a "
                             f"{kind.split('.', 1)[1]} file: give another name, or move it away first")


class FolderInUse(RuntimeError):
    """A work folder another run holds (its lock file taken)."""


LOCK_NAME = ".lock"


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, what: str = "work folder", hold: bool = True):
    """Hold ``folder`` for one run: an exclusive lock on its lock file, taken without waiting, released when the
    run ends or its process dies. A second run into the same folder gets :class:`FolderInUse` naming the
    holder's pid instead of mixing its files with the first's. ``hold=False`` (the other processes of one
    multi-process run, whose main process holds it) takes nothing."""
    if not hold:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise FolderInUse(f"{what} {folder} is in use by another run (pid {holder}); wait for it to end, or give "
                              "another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_writable_folder(folder: str | os.PathLike, what: str = "work folder") -> Path:
    """Make sure ``folder`` exists (it is created) and files can be written in it; raises PermissionError
    naming ``what`` and the folder otherwise."""
    folder = Path(folder)
    _check_folder(folder, what, folder)
    return folder


def _check_folder(folder: Path, what: str, shown: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"{what} {shown}: cannot write there ({err.strerror or err})") from None


def read_safetensors(path: str | os.PathLike, select: Callable[[str], bool] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the tensors (those whose name ``select`` accepts, or all) and the metadata of a safetensors file,
    with one clear error if it is unreadable."""
    return _read(path, lambda f: {k: f.get_tensor(k) for k in f.keys() if select is None or select(k)})


def read_safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """The tensor names and the metadata of a safetensors file, without reading any tensor."""
    return _read(path, lambda f: list(f.keys()))


def _read(path, contents):
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path}: a folder, not a .safetensors file")
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return contents(f), dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        if _pickled(path):
            raise FileFormatError(f"{path}: a pickled PyTorch checkpoint (.ckpt/.pt/.bin), not safetensors: only "
                                  "safetensors are read (a pickle can run code when loaded); use the model's "
                                  ".safetensors release or convert it where you trust the file") from None
        raise FileFormatError(f"{path}: not a readable safetensors file ({err})") from None


def _pickled(path: Path) -> bool:
    """Whether ``path`` starts as torch.save writes: a zip archive, or a bare pickle (protocol 2+)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def json_metadata(metadata: dict[str, str], key: str, path: str | os.PathLike, default=None):
    """Decode one JSON-valued metadata entry, naming the file and key if it is absent or corrupt."""
    if key not in metadata:
        if default is not None:
            return default
        raise FileFormatError(f"{path}: metadata has no '{key}' entry")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise FileFormatError(f"{path}: metadata entry '{key}' is not valid JSON") from None
