"""Scale groups found from the block itself, for model types the table does not list.

The block runs once on a probe input with hooks: linears that read the very same tensor form a
group, and the op that produced that tensor is the candidate to take 1/s (a norm, or a linear
whose output reaches the readers only through elementwise ops, tried nearest first). A fold is
accepted only when the block, with random weights in float32, computes the same function after
folding a random s into it; a norm that multiplies by (1 + weight) is found by that test too,
not by its name. A group whose producer cannot take 1/s folds nowhere (s = 1 in the deployable
form).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from awqkit.model.layout import DecoderLayout, block_linears
from awqkit.model.probing import random_copy
from awqkit.model.scale_groups import Architecture, ScaleGroup
from awqkit.model.walk import BlockInputs, first_window_probe
from awqkit.quant.fold import fold_scales

log = logging.getLogger("awqkit")

# The block's output on the probe input, for a given copy of the block.
Probe = Callable[[nn.Module], torch.Tensor]

# Relative to the output's largest magnitude: float32 rounding of a true fold stays near 1e-6; a
# wrong one changes the output by order one.
TOLERANCE = 1e-4
NORM_OFFSETS = (0.0, 1.0)  # weight, or (1 + weight) as Gemma's norms multiply


def _readers_and_producers(
    block: nn.Module, probe: Probe
) -> tuple[list[tuple[list[str], str | None]], dict[str, torch.Tensor], torch.Tensor]:
    """Groups of linears reading one tensor, in the order they first run, each with the module
    whose output that tensor is (None when no module's output is it); each linear that ran, with
    its first output; and the block's output."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    inputs: list[tuple[str, torch.Tensor]] = []
    outputs: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_pre_hook(lambda m, args, name=name: inputs.append((name, args[0])))
        for name, m in linears.items()
    ]
    handles += [
        m.register_forward_hook(lambda m, args, out, name=name: outputs.append((name, out)))
        for name, m in block.named_modules()
        if name
    ]
    output = _probed(block, probe, handles)
    groups: list[tuple[list[str], torch.Tensor]] = []
    for name, tensor in inputs:
        group = next((g for g in groups if g[1] is tensor), None)
        if group is None:
            groups.append(([name], tensor))
        elif name not in group[0]:
            group[0].append(name)
    found = []
    for names, tensor in groups:
        producer = next((name for name, out in outputs if out is tensor), None)
        found.append((names, producer))
    ran = {}
    for name, out in outputs:
        if name in linears:
            ran.setdefault(name, out)
    return found, ran, output


def _first_outputs(
    block: nn.Module, probe: Probe, names: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The first output of each of the modules ``names`` on the probe, and the block's output."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        block.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, out))
        for name in names
    ]
    return seen, _probed(block, probe, handles)


def _probed(block: nn.Module, probe: Probe, handles: list) -> torch.Tensor:
    """The block's output on the probe with the hooks of ``handles`` in place, removed after."""
    try:
        with torch.no_grad():
            return probe(block)
    finally:
        for handle in handles:
            handle.remove()


def _unchanged(after: torch.Tensor, before: torch.Tensor) -> bool:
    return bool((after - before).abs().max() <= TOLERANCE * before.abs().max())


def _folds(
    block: nn.Module,
    probe: Probe,
    reference: tuple[dict[str, torch.Tensor], torch.Tensor],
    group: ScaleGroup,
    norm_offset: float,
    seed: int,
) -> bool:
    """Whether folding a random s into ``group`` leaves the outputs of its linears and of the block
    (``reference``) unchanged: the linears' own, so a change the block's output hides (a branch
    normalised away, or small beside the residual stream) still counts."""
    width = block.get_submodule(group.balance[0]).in_features
    s = torch.exp(torch.rand(width, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    folded = copy.deepcopy(block)
    try:
        fold_scales(folded, group, s, norm_offset)
    except ValueError:  # not a per-channel weight
        return False
    linears, output = _first_outputs(folded, probe, group.balance)
    readers, expected = reference
    return _unchanged(output, expected) and all(_unchanged(linears[n], readers[n]) for n in group.balance)


def _enclosing(names: list[str]) -> str | None:
    """The innermost submodule holding every linear of a group of several (the attention for q, k,
    v): what the module objective compares. None for one linear, or when only the block holds all."""
    if len(names) < 2:
        return None
    parts = [name.split(".")[:-1] for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) or None


def discover_architecture(block: nn.Module, probe: Probe, seed: int = 0) -> Architecture:
    """The scale groups of ``block`` (any weights; a random copy is probed) and its norms' offset."""
    work = random_copy(block, seed)
    quantized = set(block_linears(work))
    readers, ran, output = _readers_and_producers(work, probe)
    reference = (ran, output)
    order = [name for names, _ in readers for name in names]
    modules = dict(work.named_modules())
    groups, offsets = [], []
    for names, producer in readers:
        balance = tuple(n for n in names if n in quantized)
        if not balance:
            continue
        group = ScaleGroup(None, balance, _enclosing(list(balance)), tuple(n for n in names if n not in quantized))
        width = modules[balance[0]].in_features
        # The producer itself, else the linears that ran before, nearest first: each block of
        # ``width`` rows of one (all of it, or a part of a fused projection), last block first.
        before = order[: order.index(names[0])]
        candidates = [(producer, None)] if producer is not None else []
        for name in reversed(before):
            rows = modules[name].out_features
            if name != producer and rows % width == 0:
                parts = rows // width
                candidates += [
                    (name, None if parts == 1 else (p * width, (p + 1) * width)) for p in reversed(range(parts))
                ]
        for smooth, rows in candidates:
            is_norm = not isinstance(modules[smooth], nn.Linear)
            tried = [o for o in (offsets or NORM_OFFSETS) if is_norm] or [0.0]
            folded = ScaleGroup(smooth, group.balance, group.module, group.compensate, rows)
            offset = next((o for o in tried if _folds(work, probe, reference, folded, o, seed)), None)
            if offset is not None:
                group = folded
                offsets += [offset] if is_norm and not offsets else []
                break
        groups.append(group)
    # A linear whose weight the block uses without calling it (Mamba's dt_proj) sees no input: a
    # group of its own, folding nowhere (the walk rounds it to nearest, having no statistics).
    groups += [ScaleGroup(None, (name,)) for name in block_linears(work) if name not in ran]
    return Architecture(tuple(groups), norm_offset=offsets[0] if offsets else 0.0)


def _structure(block: nn.Module) -> tuple:
    return tuple((name, tuple(linear.weight.shape)) for name, linear in block_linears(block).items())


def discover_blocks(layout: DecoderLayout, inputs: BlockInputs) -> list[Architecture]:
    """Each block's scale groups for a model type the table does not list, found once per block
    structure (a hybrid decoder holds several), each said in one line."""
    found: dict[tuple, Architecture] = {}
    for index, block in enumerate(layout.blocks):
        structure = _structure(block)
        if structure in found:
            continue
        found[structure] = architecture = discover_architecture(block, first_window_probe(inputs, index))
        folds = [f"{g.folds_into} -> {', '.join(g.balance)}" for g in architecture.scale_groups if g.smooth]
        unscaled = [", ".join(g.balance) for g in architecture.scale_groups if not g.smooth]
        alike = sum(_structure(other) == structure for other in layout.blocks) - 1
        log.info(
            "scale groups found from block %d%s: 1/s folds into %s%s",
            index, f" (and {alike} like it)" if alike else "", "; ".join(folds) or "nothing",
            f"; s = 1 for {'; '.join(unscaled)} (no op before them takes 1/s)" if unscaled else "",
        )  # fmt: skip
    return [found[_structure(block)] for block in layout.blocks]
