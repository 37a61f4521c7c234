"""Hugging Face cache references (``org/name[@revision]``), resolved offline, never downloaded.

The cache folder follows ``huggingface_hub.constants.HF_HUB_CACHE``'s rules without importing it (the core
install has no huggingface_hub): ``--cache-dir``, else ``HF_HUB_CACHE``, else the legacy
``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub`` with ``HF_HOME`` defaulting to ``$XDG_CACHE_HOME/huggingface``
(``~/.cache/huggingface``); ``~`` and ``$VAR`` are expanded as huggingface_hub expands them. Stricter than
the hub library on purpose: a revision may not climb out of the repository (``..``), a ref file must hold a
plain commit name, and the snapshot must resolve inside the repository's ``snapshots`` folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InputError
from .guard import within_roots

HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def _expand(p: str) -> str:
    return os.path.expandvars(os.path.expanduser(p))


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub chooses it (offline)."""
    if cache_dir:
        return Path(_expand(os.fspath(cache_dir)))
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(_expand(env))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(_expand(home)) / "hub"


_REV_RE = re.compile(r"^[\w.\-]+(/[\w.\-]+)*$")


def resolve_hf_cache(ref: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Resolve ``org/name[@revision]`` to its snapshot folder in the local cache, never downloading.

    The revision is a branch or tag (looked up in ``refs/``) or a commit hash; it may not climb out of
    the repository (``..``), and the snapshot it names must be a folder under ``snapshots/``.
    """
    repo, _, rev = ref.partition("@")
    rev = rev or "main"
    if not _REV_RE.match(rev) or any(part in (".", "..") for part in rev.split("/")):
        raise InputError(f"{ref}: revision {rev!r} is not a branch, tag or commit name.")
    root = hf_cache_dir(cache_dir) / ("models--" + repo.replace("/", "--"))
    if not root.is_dir():
        raise InputError(f"{ref}: no such path, and not in the Hugging Face cache at {root.parent} (rlsubnet never downloads).")
    ref_file = root / "refs" / rev
    commit = rev
    if ref_file.is_file():
        try:
            commit = ref_file.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise InputError(f"{ref_file}: not a readable reference (expected a commit hash in UTF-8).") from None
        if not re.fullmatch(r"[\w.\-]+", commit) or commit in (".", ".."):
            raise InputError(f"{ref_file}: does not hold a commit hash.")
    snaps_dir = root / "snapshots"
    snap = snaps_dir / commit
    if not snap.is_dir():
        snaps = sorted(snaps_dir.glob("*")) if snaps_dir.is_dir() else []
        if len(snaps) == 1 and not ref_file.is_file() and rev == "main":
            snap = snaps[0]
        else:
            raise InputError(f"{ref}: revision '{rev}' is not in the Hugging Face cache at {root}.")
    if not within_roots(str(snap), [Path(os.path.realpath(snaps_dir))]):
        raise InputError(f"{ref}: snapshot '{commit}' links outside the cache folder {root}.")
    return snap
