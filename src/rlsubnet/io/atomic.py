"""Atomic writing: outputs appear whole or not at all, and never land on an input.

Everything rlsubnet writes goes to a temporary name in the destination folder and is renamed into place
after an fsync, so an interrupted run never leaves a half-written file behind. The rules:

- temporary names carry the writer's pid (``.NAME.PID.RANDOM.tmp``); a later write to the same
  destination removes the temporaries of writers that are no longer alive (a ``kill -9`` leftover);
- a folder replaces an existing folder with one ``renameat2(RENAME_EXCHANGE)`` (Linux), so at every
  instant the destination holds either the old or the new folder; the old one is removed afterwards;
- files and folders are created with the modes the umask gives (not ``mkstemp``'s 0600/0700);
- an ``OSError`` of the destination (a folder where a file should go, a parent that is a file, no
  permission, a name too long, a full disk) becomes one :class:`InputError` sentence naming it;
- every destination written by this process is recorded (:func:`written`), so an interrupted command
  can say exactly what it did and did not write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputError

_WRITTEN: list[str] = []


def written() -> list[str]:
    """Destinations this process has completed (and that still exist), in order."""
    return [p for p in dict.fromkeys(_WRITTEN) if os.path.lexists(p)]


def record_written(path: str | os.PathLike) -> None:
    """Record a destination completed by a caller that moved it into place itself."""
    _WRITTEN.append(str(path))


def _umask() -> int:
    m = os.umask(0o22)
    os.umask(m)
    return m


def _os_error(dest: Path, e: OSError) -> InputError:
    reason = {
        errno.EISDIR: "it is a folder",
        errno.ENOTDIR: "a part of its path is a file, not a folder",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.ENAMETOOLONG: "the name is too long",
    }.get(e.errno, e.strerror or str(e))
    return InputError(f"{dest}: cannot write output ({reason}).")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(folder: Path, name: str, kinds: tuple[str, ...]):
    """(entry, writer pid) for every ``.NAME.PID.RANDOM.KIND`` temporary of rlsubnet's in ``folder``."""
    pat = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[0-9a-f]{{8}}\.({'|'.join(kinds)})$")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for ent in entries:
        m = pat.match(ent.name)
        if m:
            yield ent, int(m.group(1))


def live_writer(dest: Path, kind: str = "work") -> int | None:
    """The pid of another live process that holds a ``kind`` temporary for ``dest``, if any."""
    for _, pid in _ours(dest.parent, dest.name, (kind,)):
        if pid != os.getpid() and _pid_alive(pid):
            return pid
    return None


def clean_stale(folder: Path, name: str, kinds: tuple[str, ...] = ("tmp", "old", "work")) -> list[Path]:
    """Remove ``.NAME.PID.*.{tmp,old,work}`` leftovers in ``folder`` whose writer process is dead.

    Only names of rlsubnet's own pattern are touched; returns what was removed.
    """
    removed = []
    for ent, pid in _ours(folder, name, kinds):
        if _pid_alive(pid):
            continue
        p = Path(ent.path)
        with contextlib.suppress(OSError):
            if ent.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def temp_name(dest: Path, kind: str) -> Path:
    """A fresh rlsubnet-owned temporary name next to ``dest`` (``.NAME.PID.RANDOM.KIND``)."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _prepare(dest: str | os.PathLike, want_dir: bool) -> Path:
    dest = Path(dest)
    if dest.name in ("", ".", ".."):
        raise InputError(f"{dest}: not a valid output name.")
    if not want_dir and dest.is_dir():
        raise InputError(f"{dest}: cannot write output (it is a folder).")
    if want_dir and dest.exists() and not dest.is_dir():
        raise InputError(f"{dest}: cannot write output folder (a file of that name exists).")
    for anc in dest.parents:  # the nearest existing ancestor must be a folder
        if os.path.lexists(anc):
            if not anc.is_dir():
                raise _os_error(dest, OSError(errno.ENOTDIR, "not a folder"))
            break
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(dest, e) from None
    clean_stale(dest.parent, dest.name)
    return dest


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is renamed onto ``dest``.

    The caller writes the file (with any library) to the yielded path. On an exception the temporary
    file is removed and ``dest`` is left untouched.
    """
    dest = _prepare(dest, want_dir=False)
    tmp = temp_name(dest, "tmp")
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            os.close(fd)
        except OSError as e:
            raise _os_error(dest, e) from None
        yield tmp
        try:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, dest)
        except OSError as e:
            raise _os_error(dest, e) from None
        _WRITTEN.append(str(dest))
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, InputError):
            raise _os_error(dest, e) from None
        raise


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``dest`` atomically."""
    write_bytes(dest, text.encode("utf-8"))


def write_with(dest: str | os.PathLike, writer: Callable[[Path], None], suffix: str = "") -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``dest`` atomically."""
    with atomic_path(dest, suffix=suffix) as tmp:
        writer(tmp)


_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    r = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move folder ``tmp`` onto ``dest`` atomically, replacing an existing ``dest`` folder as a whole."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    if exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = temp_name(dest, "old")  # fallback: two renames; the old folder survives under a visible name
    os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``dest``; on success it replaces ``dest`` as a whole.

    Callers that may replace an existing folder must first check that it is theirs to replace
    (:func:`rlsubnet.io.guard.check_replaceable`).
    """
    dest = _prepare(dest, want_dir=True)
    tmp = temp_name(dest, "tmp")
    try:
        try:
            os.mkdir(tmp, 0o777)
        except OSError as e:
            raise _os_error(dest, e) from None
        yield tmp
        try:
            replace_dir(tmp, dest)
        except OSError as e:
            raise _os_error(dest, e) from None
        _WRITTEN.append(str(dest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
