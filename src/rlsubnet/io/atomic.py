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
import stat
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


def stream_kind(dest: str | os.PathLike) -> str | None:
    """"stream" for an existing character device or FIFO (``/dev/null``, ``/dev/stdout``, ``>(jq .)``), which
    is written into, never replaced; "refused" for a block device or socket; None for anything else."""
    try:
        st = os.stat(dest)  # follows links: /dev/fd/63 is a link to the pipe
    except OSError:
        return None
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "stream"
    if stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        return "refused"
    return None


@contextlib.contextmanager
def _into_stream(dest: Path) -> Iterator[Path]:
    """The caller writes a private temporary file; on success its bytes are written into ``dest`` (a device or
    pipe, opened without creating or truncating anything), and the temporary is removed either way."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="rlsubnet-out-"))
    tmp = folder / (dest.name or "out")
    try:
        yield tmp
        try:
            fd = os.open(dest, os.O_WRONLY)
            with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except OSError as e:
            raise _os_error(dest, e) from None
        _WRITTEN.append(str(dest))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is renamed onto ``dest``.

    The caller writes the file (with any library) to the yielded path. On an exception the temporary
    file is removed and ``dest`` is left untouched. A ``dest`` that is a character device or a FIFO is
    written into instead (renaming over ``/dev/null`` would replace the machine's device node); a block
    device or a socket is refused.
    """
    kind = stream_kind(dest)
    if kind == "refused":
        raise InputError(f"{dest}: cannot write output (it is a block device or a socket).")
    if kind == "stream":
        with _into_stream(Path(dest)) as tmp:
            yield tmp
        return
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


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """``renameat2(a, b, flags)``; False where the system cannot (no such call, or a file system without it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    r = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), flags)
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); False where the system cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_new(tmp: Path, dest: Path) -> bool:
    """Move ``tmp`` to ``dest`` only if nothing is there (False: something appeared at ``dest``)."""
    try:
        if _renameat2(tmp, dest, _RENAME_NOREPLACE):
            return True
    except FileExistsError:
        return False
    try:  # no renameat2: rename(2) replaces only an empty folder, and fails on anything else
        os.rename(tmp, dest)
        return True
    except (FileExistsError, IsADirectoryError, NotADirectoryError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
        return False


def replace_dir(tmp: Path, dest: Path, guard: str | None = None) -> None:
    """Move folder ``tmp`` onto ``dest`` atomically, replacing an existing ``dest`` folder as a whole.

    With ``guard`` (the option that named ``dest``) an existing ``dest`` is replaced only if it is rlsubnet's
    to replace (empty, or holding the marker: :func:`rlsubnet.io.guard.replaceable_problem`), checked at the
    moment of the swap: the two folders are exchanged in one step and, if what came out of ``dest`` was not
    ours (it appeared or changed while the command ran), exchanged back and refused. Nothing of the user's
    is ever deleted. Without ``guard`` a folder that did not exist is still never replaced by surprise.
    """
    from .guard import replaceable_problem

    if not os.path.lexists(dest):
        if _rename_new(tmp, dest):
            return
        if guard is None:  # it appeared between the check and the rename: never replaced by surprise
            raise InputError(f"{dest}: appeared while this command ran; refusing to replace it.")
    if guard is not None:
        why = replaceable_problem(dest, guard)
        if why:
            raise InputError(f"{dest}: {why}")
    if exchange(tmp, dest):
        why = replaceable_problem(tmp, guard) if guard is not None else None
        if why:  # something not ours was put there between the check and the swap: put it back
            exchange(tmp, dest)
            raise InputError(f"{dest}: {why}")
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = temp_name(dest, "old")  # fallback: two renames; the old folder survives under a visible name
    os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, guard: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``dest``; on success it replaces ``dest`` as a whole.

    ``guard`` names the option of a user-chosen output folder: it is then checked to be rlsubnet's to replace
    before the work starts and again at the swap (:func:`replace_dir`).
    """
    if guard is not None:
        from .guard import check_replaceable

        check_replaceable(dest, guard)
    dest = _prepare(dest, want_dir=True)
    tmp = temp_name(dest, "tmp")
    try:
        try:
            os.mkdir(tmp, 0o777)
        except OSError as e:
            raise _os_error(dest, e) from None
        yield tmp
        try:
            replace_dir(tmp, dest, guard)
        except OSError as e:
            raise _os_error(dest, e) from None
        _WRITTEN.append(str(dest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
