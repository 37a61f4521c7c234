"""Result objects of the diff: plain dataclasses that serialise to the documented JSON contract."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..io.jsonout import dumps
from .floor import FloorSummary


def _sparsity(changed: int, numel: int) -> float:
    return 1.0 - changed / numel if numel else 1.0


def _plain(v: Any) -> Any:
    """A copy of a field's value as JSON-ready containers (what ``dataclasses.asdict`` gives for these fields, without
    its deep copy of every leaf: 20 µs a tensor against asdict's 75 µs, which is seconds on a MoE of 90K tensors)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "to_dict"):
        return v.to_dict()
    return v


def _fields(obj) -> dict:
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}


@dataclass
class TensorDiff:
    """Every probe's numbers for one aligned tensor pair."""

    name: str
    shape: list[int]
    dtype: str
    numel: int
    changed: int
    atol: list[dict]  # [{"atol": float, "changed": int}]
    bf16_rel_changed: int
    ulp_hist: dict[str, int]
    max_abs_delta: float
    l2_delta: float
    l2_base: float
    layer: int | None
    kind: str
    tuned_dtype: str
    sliced: bool = False
    nonfinite: int = 0  # changed entries whose value or difference is not finite (then max/L2 are NaN → null)
    floor: FloorSummary | None = None  # with lr_sum: the precision floor of this tensor
    # quantized storage: {"format", "block", "codes_changed", "scales_changed"} (and, for a quantized base against
    # an unquantized tuned side, "survive_requantize": changes still there after rounding tuned into base's grid)
    quantized: dict | None = None

    @property
    def sparsity(self) -> float:
        return _sparsity(self.changed, self.numel)

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def to_dict(self) -> dict:
        d = _fields(self)
        if d["floor"] is None:
            d.pop("floor")
        if d["quantized"] is None:
            d.pop("quantized")
        d["sparsity"] = self.sparsity
        return d


@dataclass
class Group:
    """Pooled numbers over a set of tensors (one layer, or one module kind)."""

    key: str
    tensors: int
    numel: int
    changed: int
    atol: list[dict]
    bf16_rel_changed: int
    floor: FloorSummary | None = None

    @property
    def sparsity(self) -> float:
        return _sparsity(self.changed, self.numel)

    def to_dict(self) -> dict:
        d = _fields(self)
        if d["floor"] is None:
            d.pop("floor")
        d["sparsity"] = self.sparsity
        for a in d["atol"]:
            a["sparsity"] = _sparsity(a["changed"], self.numel)
        d["bf16_rel_sparsity"] = _sparsity(self.bf16_rel_changed, self.numel)
        return d


@dataclass
class DiffResult:
    """The comparison of two checkpoints (``rlsubnet.diff``). ``to_json()`` gives the CLI's ``--json``."""

    base: str
    tuned: str
    numel: int
    changed: int
    atol: list[dict]  # [{"atol", "changed", "sparsity"}]
    eta: float
    bf16_rel_changed: int
    ulp_hist: dict[str, int]
    tensors: list[TensorDiff]
    skipped: list[dict]
    buffers: list[TensorDiff] = field(default_factory=list)  # stored non-parameter buffers, not counted
    by_layer: list[Group] = field(default_factory=list)
    by_module: list[Group] = field(default_factory=list)
    paper_layerwise_density: float | None = None
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    rank: Any = None  # a RankResult when requested
    mask_bits: dict | None = field(default=None, repr=False)  # name -> packed uint8 bits (--mask-out)
    fingerprints: dict | None = None  # {"base": str, "tuned": str} when a mask was collected
    floor: FloorSummary | None = None  # with lr_sum: the precision floor of the whole model
    by_exponent: list[dict] | None = None  # with lr_sum: changed fraction per exponent of |w0|
    quantized: dict | None = None  # {"tensors", "codes_changed", "scales_changed"} over quantized parameters
    moe: dict | None = None  # per layer: router, shared experts, routed experts (see analysis/experts.py)

    @property
    def sparsity(self) -> float:
        return _sparsity(self.changed, self.numel)

    @property
    def bf16_rel_sparsity(self) -> float:
        return _sparsity(self.bf16_rel_changed, self.numel)

    def atol_sparsity(self, tol: float) -> float:
        """Sparsity at absolute tolerance ``tol`` (one of the tolerances the diff computed)."""
        for a in self.atol:
            if a["atol"] == tol:
                return a["sparsity"]
        computed = ", ".join(f"{a['atol']:g}" for a in self.atol)
        raise ValueError(f"tolerance {tol!r} was not computed by this diff (computed: {computed}); pass it in atol=[...]")

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "base": self.base,
            "tuned": self.tuned,
            "summary": {
                "numel": self.numel,
                "changed": self.changed,
                "sparsity": self.sparsity,
                "atol": [dict(a) for a in self.atol],
                "bf16_rel": {"eta": self.eta, "changed": self.bf16_rel_changed, "sparsity": self.bf16_rel_sparsity},
                "ulp_hist": dict(self.ulp_hist),
                "paper_layerwise_density": self.paper_layerwise_density,
                **({"floor": self.floor.to_dict(), "by_exponent": self.by_exponent} if self.floor is not None else {}),
                **({"quantized": dict(self.quantized)} if self.quantized is not None else {}),
            },
            "tensors": [t.to_dict() for t in self.tensors],
            "skipped": list(self.skipped),
            "buffers": [t.to_dict() for t in self.buffers],
            "by_layer": [g.to_dict() for g in self.by_layer],
            "by_module": [g.to_dict() for g in self.by_module],
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
        }
        if self.rank is not None:
            out["rank"] = self.rank.to_dict()
        if self.moe is not None:
            out["moe"] = self.moe
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON; indented two levels deep (the summary's entries, one tensor or group a line)."""
        return dumps(self.to_dict(), indent=indent, flat_below=2)
