"""``awqkit diff``: how two safetensors checkpoints differ, tensor by tensor and layer by layer.

A checkpoint is a .safetensors file or a folder: the shards its model.safetensors.index.json
names, else model.safetensors, else every *.safetensors in it (so a quantized folder's
awq_scales.safetensors, which transformers never loads, is left out). One tensor pair is in
memory at a time, and the float64 arithmetic runs on slices, so any checkpoint size fits.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from awqkit.io.safetensors import TensorHeader, checkpoint_files, dtype_name, read_tensors, tensor_headers
from awqkit.markdown import markdown_table
from awqkit.model.load import check_no_custom_code

log = logging.getLogger("awqkit")


CHUNK_ELEMENTS = 1 << 24  # float64 temporaries of at most 128 MB each


LAYER_PREFIX = re.compile(r"^(.*?\b(?:layers|h|blocks)\.\d+)\.")


OUTSIDE_LAYERS = "(outside layers)"


MAX_PRINTED_TENSORS = 40


@dataclass
class TensorDiff:
    """One tensor name in A and/or B. Numbers are None where shapes differ or a side is missing."""

    name: str
    status: str  # equal, differ, dtype mismatch, shape mismatch, only in A, only in B
    dtype_a: str | None
    dtype_b: str | None
    shape_a: list[int] | None
    shape_b: list[int] | None
    max_abs: float | None = None
    differing_share: float | None = None
    rel_frobenius: float | None = None  # ||a - b|| / ||a||
    sq_diff: float | None = None  # sum (a - b)^2, kept to add up per layer
    sq_ref: float | None = None  # sum a^2


@dataclass
class LayerSummary:
    layer: str
    tensors: int
    differing: int
    max_abs: float | None
    rel_frobenius: float | None


@dataclass
class CheckpointDiff:
    a: str
    b: str
    tensors: list[TensorDiff]  # in model order

    @property
    def identical(self) -> bool:
        return all(t.status == "equal" for t in self.tensors)

    @property
    def first_difference(self) -> TensorDiff | None:
        return next((t for t in self.tensors if t.status != "equal"), None)

    def layers(self) -> list[LayerSummary]:
        groups: dict[str, list[TensorDiff]] = {}
        for t in self.tensors:
            groups.setdefault(layer_of(t.name), []).append(t)
        return [summarize_layer(name, members) for name, members in groups.items()]

    def to_json(self) -> dict:
        first = self.first_difference
        return {
            "a": self.a,
            "b": self.b,
            "identical": self.identical,
            "counts": dict(Counter(t.status for t in self.tensors)),
            "first_difference": first.name if first else None,
            "layers": [asdict(layer) for layer in self.layers()],
            "tensors": [asdict(t) for t in self.tensors],
        }


def layer_of(name: str) -> str:
    match = LAYER_PREFIX.match(name)
    return match.group(1) if match else OUTSIDE_LAYERS


def summarize_layer(layer: str, tensors: list[TensorDiff]) -> LayerSummary:
    measured = [t for t in tensors if t.sq_diff is not None]
    sq_diff, sq_ref = sum(t.sq_diff for t in measured), sum(t.sq_ref for t in measured)
    return LayerSummary(
        layer=layer,
        tensors=len(tensors),
        differing=sum(t.status != "equal" for t in tensors),
        max_abs=max((t.max_abs for t in measured), default=None),
        rel_frobenius=_relative(sq_diff, sq_ref) if measured else None,
    )


def _relative(sq_diff: float, sq_ref: float) -> float:
    if sq_ref == 0:
        return 0.0 if sq_diff == 0 else math.inf
    return math.sqrt(sq_diff / sq_ref)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns: "equal" means equal bytes, so NaN equals itself and -0.0 differs from 0.0."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def compare_tensors(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
    """Equality, max |a - b|, share of differing elements and relative Frobenius error of one pair."""
    dtype_a, dtype_b = str(a.dtype).removeprefix("torch."), str(b.dtype).removeprefix("torch.")
    diff = TensorDiff(name, "equal", dtype_a, dtype_b, list(a.shape), list(b.shape))
    if a.shape != b.shape:
        diff.status = "shape mismatch"
        return diff
    same_dtype = a.dtype == b.dtype
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    differing, max_abs, sq_diff, sq_ref = 0, torch.tensor(0.0, dtype=torch.float64), 0.0, 0.0
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        x, y = flat_a[start : start + CHUNK_ELEMENTS], flat_b[start : start + CHUNK_ELEMENTS]
        x64, y64 = x.double(), y.double()
        sq_ref += torch.dot(x64, x64).item()
        # Across dtypes bytes cannot match; compare values instead.
        differs = _bits(x) != _bits(y) if same_dtype else x64 != y64
        n_differs = int(differs.sum())
        if n_differs:  # most tensor pairs are equal: skip the arithmetic
            differing += n_differs
            # Only differing elements count, so a NaN present in both sides is no difference.
            delta = (x64 - y64).masked_fill_(~differs, 0.0)
            max_abs = torch.maximum(max_abs, delta.abs().max())  # NaN, if any, propagates
            sq_diff += torch.dot(delta, delta).item()
    diff.max_abs, diff.sq_diff, diff.sq_ref = max_abs.item(), sq_diff, sq_ref
    diff.differing_share = differing / max(a.numel(), 1)
    diff.rel_frobenius = _relative(sq_diff, sq_ref)
    if not same_dtype:
        diff.status = "dtype mismatch"
    elif differing:
        diff.status = "differ"
    return diff


def _natural_key(name: str) -> list:
    # "layers.10" after "layers.9": digits compare as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def model_order(folder: Path) -> dict[str, int]:
    """Tensor name -> position in the model's own state dict, built on the meta device (no memory).

    Empty when ``folder`` has no config.json transformers understands; names then sort naturally.
    """
    if not (folder / "config.json").is_file():
        return {}
    from transformers import AutoConfig

    from awqkit.model.load import model_class

    try:
        with torch.device("meta"):
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            model = model_class(config).from_config(config)
    except (OSError, ValueError, KeyError) as error:
        log.info("tensors sorted by name: no model order from %s (%s)", folder, error)
        return {}
    return {name: i for i, name in enumerate(model.state_dict())}


def _describe_missing(name: str, header: TensorHeader, side: str) -> TensorDiff:
    dtype = dtype_name(header.dtype)
    if side == "A":
        return TensorDiff(name, "only in A", dtype, None, header.shape, None)
    return TensorDiff(name, "only in B", None, dtype, None, header.shape)


def _load(header: TensorHeader, name: str) -> torch.Tensor:
    return read_tensors({name: header.file}, [name])[name]


def diff_checkpoints(a: str | Path, b: str | Path) -> CheckpointDiff:
    """Compare every tensor of checkpoints ``a`` and ``b``, in the order of ``a``'s model."""
    for path in (a, b):
        check_no_custom_code(path)
    where_a, where_b = tensor_headers(checkpoint_files(a)), tensor_headers(checkpoint_files(b))
    folders = [Path(p).expanduser() for p in (a, b)]
    order = next((o for o in (model_order(f) for f in folders if f.is_dir()) if o), {})
    names = sorted(where_a.keys() | where_b.keys(), key=lambda n: (order.get(n, len(order)), _natural_key(n)))
    tensors = []
    for name in names:
        if name not in where_b:
            tensors.append(_describe_missing(name, where_a[name], "A"))
        elif name not in where_a:
            tensors.append(_describe_missing(name, where_b[name], "B"))
        else:
            tensors.append(compare_tensors(name, _load(where_a[name], name), _load(where_b[name], name)))
    return CheckpointDiff(str(a), str(b), tensors)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _tensor_row(t: TensorDiff) -> list[str]:
    def side(dtype: str | None, shape: list[int] | None) -> str:
        return "missing" if dtype is None else f"{dtype} {shape}"

    share = None if t.differing_share is None else 100 * t.differing_share
    numbers = [_number(t.max_abs, ".3g"), _number(share, ".4g"), _number(t.rel_frobenius, ".3e")]
    return [t.name, t.status, side(t.dtype_a, t.shape_a), side(t.dtype_b, t.shape_b), *numbers]


def format_diff(diff: CheckpointDiff) -> str:
    """A readable report: verdict, first difference, per-layer summary, then the differing tensors."""
    lines = [f"A: {diff.a}", f"B: {diff.b}"]
    counts = Counter(t.status for t in diff.tensors)
    if diff.identical:
        return "\n".join(lines + [f"identical: all {len(diff.tensors)} tensors equal bit for bit"])
    differing = [t for t in diff.tensors if t.status != "equal"]
    lines.append(
        f"differ: {len(differing)} of {len(diff.tensors)} tensors ("
        + ", ".join(f"{status} {n}" for status, n in counts.items())
        + ")"
    )
    lines.append(f"first difference (model order): {diff.first_difference.name} ({diff.first_difference.status})")
    layers = diff.layers()
    changed_layers = [layer for layer in layers if layer.differing]
    rows = [
        [
            layer.layer,
            str(layer.tensors),
            str(layer.differing),
            _number(layer.max_abs, ".3g"),
            _number(layer.rel_frobenius, ".3e"),
        ]
        for layer in changed_layers
    ]
    lines += ["", markdown_table(["layer", "tensors", "differing", "max |a-b|", "rel Frobenius"], rows)]
    unchanged = len(layers) - len(changed_layers)
    if unchanged:
        lines.append(f"(and {unchanged} groups without a difference)")
    headers = ["tensor", "status", "A", "B", "max |a-b|", "% elements differ", "rel Frobenius"]
    lines += ["", markdown_table(headers, [_tensor_row(t) for t in differing[:MAX_PRINTED_TENSORS]])]
    if len(differing) > MAX_PRINTED_TENSORS:
        lines.append(f"... {len(differing) - MAX_PRINTED_TENSORS} more differing tensors (all in --json)")
    return "\n".join(lines)
