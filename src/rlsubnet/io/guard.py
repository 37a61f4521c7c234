"""Inputs are sacred: an output never lands on an input, and a folder is replaced only if rlsubnet wrote it.

:func:`check_outputs` refuses (with an :class:`InputError`, exit 2) any output path that is an input,
lies inside an input folder, or would contain an input (a folder output that is an ancestor of one).
:func:`check_replaceable` refuses to replace an existing folder unless it is empty or carries the
marker file rlsubnet writes into every folder it produces (:data:`MARKER`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterable, Mapping

from .errors import InputError


# -- containment: nothing outside what the user named is read ------------------------------------------------
def require_regular(path: str | os.PathLike) -> None:
    """Refuse anything but a regular file (a FIFO would block forever, a device never ends)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read file ({e.strerror}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket cannot be a checkpoint).")


def allowed_roots(root: Path) -> list[Path]:
    """Where files of the folder ``root`` may really live: the folder, and for a Hugging Face cache
    snapshot (``models--org--name/snapshots/REV``) the repository's ``blobs`` folder it links into."""
    real = Path(os.path.realpath(root))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def within_roots(path: str, roots: list[Path]) -> bool:
    """True when ``path``, symbolic links resolved, lies in one of ``roots``."""
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in roots)


def _inside(root: Path, rel: str, index_path: Path) -> str:
    """Join an index entry to its folder, refusing absolute paths and any escape from the folder
    (including through symbolic links)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel or "\0" in rel:
        raise InputError(f"{index_path}: index entry {rel!r} is not a file name inside the checkpoint folder.")
    norm = os.path.normpath(rel)
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise InputError(f"{index_path}: index entry {rel!r} points outside the checkpoint folder.")
    full = root / norm
    if not os.path.lexists(full):
        raise InputError(f"{index_path}: index entry {rel!r} names a file that does not exist.")
    if not within_roots(str(full), allowed_roots(root)):
        raise InputError(f"{index_path}: index entry {rel!r} links to a file outside the checkpoint folder.")
    require_regular(full)
    return str(full)


# -- outputs ----------------------------------------------------------------------------------------------

MARKER = ".rlsubnet-output.json"  # written into every output folder; its presence makes the folder ours


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None],
                  folder_outputs: Iterable[str] = ()) -> None:
    """Refuse outputs that would land on an input.

    ``outputs`` maps an option name (``--json``) to its path (``None`` or ``-`` = not written);
    ``inputs`` are the paths the command reads (files or folders; names that are not local paths, such
    as cache references, are ignored). ``folder_outputs`` names the options whose output is a folder that
    replaces or fills the destination; such an output may not contain an input either.
    """
    ins = [(str(i), _real(i)) for i in inputs if i is not None and os.path.lexists(os.path.expanduser(os.fspath(i)))]
    folder_outputs = set(folder_outputs)
    seen: dict[Path, str] = {}
    for opt, out in outputs.items():
        if out is None or os.fspath(out) == "-":
            continue
        ro = _real(out)
        if ro in seen:
            raise InputError(f"{out}: {opt} and {seen[ro]} name the same output.")
        seen[ro] = opt
        for shown, ri in ins:
            if ro == ri:
                raise InputError(f"{out}: {opt} names the input {shown}; refusing to overwrite an input.")
            if ri.is_dir() and _within(ro, ri):
                raise InputError(f"{out}: {opt} lies inside the input folder {shown}; refusing to write into an input.")
            if opt in folder_outputs and _within(ri, ro):
                raise InputError(f"{out}: {opt} would contain the input {shown}; refusing to replace it.")


def write_marker(folder: str | os.PathLike, what: str, **info) -> None:
    """Mark ``folder`` as written by rlsubnet (so a later run may replace it)."""
    (Path(folder) / MARKER).write_text(json.dumps({"written_by": "rlsubnet", "what": what, **info}) + "\n")


def replaceable_problem(dest: str | os.PathLike, option: str = "--out") -> str | None:
    """Why rlsubnet may not replace ``dest`` (None when it does not exist, is an empty folder, or holds the marker)."""
    p = Path(dest)
    if not os.path.lexists(p):
        return None
    if p.is_symlink():
        return f"{option} is a symbolic link; refusing to replace it."
    if not p.is_dir():
        return f"{option} exists and is not a folder; refusing to replace it."
    try:
        entries = os.listdir(p)
    except OSError as e:
        return f"cannot read {option} ({e.strerror})."
    if entries and MARKER not in entries:
        return (f"{option} exists, is not empty and was not written by rlsubnet; refusing to replace it "
                "(choose a new folder or remove it yourself).")
    return None


def check_replaceable(dest: str | os.PathLike, option: str = "--out") -> None:
    """Refuse to replace ``dest`` unless it does not exist, is an empty folder, or holds rlsubnet's marker."""
    why = replaceable_problem(dest, option)
    if why:
        raise InputError(f"{dest}: {why}")
