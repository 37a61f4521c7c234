"""Optional dependencies: a missing extra is one sentence naming what to install, never a traceback.

The core (``diff``, ``mask``, ``overlap``, ``closeness``, ``verify-frozen``, patches) needs numpy,
safetensors, zstandard, typer and rich. Training, rank, ``.bin`` checkpoints, live sync, plots, the study,
Ray and object storage are extras (``pip install 'rlsubnet[train]'``, ``[plot]``, ``[study]``, ``[ray]``,
``[s3]``, ``[all]``).
"""

from __future__ import annotations

import importlib.util

from .errors import InputError

EXTRAS = {"torch": "train", "transformers": "train", "trl": "train", "accelerate": "train", "datasets": "train",
          "matplotlib": "plot", "gguf": "study", "ray": "ray", "s3fs": "s3", "fsspec": "s3"}


def need(*modules: str, what: str) -> None:
    """Refuse in one sentence (exit 2 at the command line) when one of ``modules`` is not installed."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            extra = EXTRAS.get(m, "all")
            raise InputError(f"{what} needs the optional package {m}, which is not installed: pip install 'rlsubnet[{extra}]'.")
