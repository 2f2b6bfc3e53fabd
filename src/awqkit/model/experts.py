"""Mixture-of-experts blocks as linears awqkit can calibrate and quantize.

transformers 5 keeps a block's experts fused: ``gate_up_proj`` [E, 2I, H] (each expert's gate
rows, then its up rows) and ``down_proj`` [E, H, I], 3-D parameters of one module, not nn.Linear.
awqkit's walk quantizes nn.Linear, so the fused module is replaced by ``LinearExperts``: one
``Expert`` per index, each holding its gate, up and down projections as nn.Linear under the names
checkpoints store them by (``experts.3.gate_proj.weight``; Mixtral's ``w1``, ``w3``, ``w2``). The
router (``mlp.gate``) is not an nn.Linear and stays float.

``LinearExperts`` computes what the fused module computes: each token's output is the routing-
weighted sum of its top-k experts' outputs. With ``every_token`` (the default for calibration),
each expert also runs on the tokens not routed to it, so its linears' statistics and search
tokens come from every calibration token (llm-compressor's ``moe_calibrate_all_experts``), while
the output still sums only the routed experts, so the next block sees the true hidden states.
Llama-4 calls its experts another way, on every token stacked per expert and pre-weighted by the
router (``LinearExperts._stacked``).
"""

from __future__ import annotations

import copy
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from awqkit.errors import UnsupportedModelError
from awqkit.model.probing import random_copy


@dataclass(frozen=True)
class ExpertNames:
    """What a model's checkpoints call an expert's projections; no gate for experts that compute
    down(act(up(x))) (Nemotron-H)."""

    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


# model_type -> the projection names of its experts (architectures as data)
EXPERT_NAMES = {
    "mixtral": ExpertNames("w1", "w3", "w2"),
    "qwen2_moe": ExpertNames(),
    "qwen3_moe": ExpertNames(),
}


def _fused(module: nn.Module, name: str) -> torch.Tensor | None:
    tensor = getattr(module, name, None)
    return tensor if isinstance(tensor, torch.Tensor) and tensor.dim() == 3 else None


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts: 3-D ``gate_up_proj`` [E, 2I, H] (or, ungated, ``up_proj``
    [E, I, H]) and ``down_proj`` [E, H, I]."""
    up = _fused(module, "gate_up_proj") if _fused(module, "gate_up_proj") is not None else _fused(module, "up_proj")
    return up is not None and _fused(module, "down_proj") is not None


@dataclass(frozen=True)
class FusedLayout:
    """Where each expert's rows sit in transformers' fused tensors: ``gate_up_proj`` [E, 2I, H]
    and ``down_proj`` [E, H, I] (rows as nn.Linear holds them) or, transposed, [E, H, 2I] and
    [E, I, H] (gpt-oss multiplies x @ W); gate rows then up rows, or interleaved (gate 0, up 0,
    gate 1, ...)."""

    transposed: bool = False
    interleaved: bool = False

    def rows(self, fused: torch.Tensor) -> torch.Tensor:
        """[E, out, in] (a bias [E, out] as it is) from the stored tensor."""
        return fused.transpose(1, 2) if self.transposed and fused.dim() == 3 else fused

    def stored(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.transpose(1, 2) if self.transposed and rows.dim() == 3 else rows

    def split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate and up rows (or bias entries) of [E, 2I, ...]."""
        return (gate_up[:, 0::2], gate_up[:, 1::2]) if self.interleaved else gate_up.chunk(2, dim=1)

    def join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.stack([gate, up], dim=2).flatten(1, 2) if self.interleaved else torch.cat([gate, up], dim=1)

    def join_last(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """An activation's gate and up as the fused forward computes them (along the last dim)."""
        return torch.stack([gate, up], dim=-1).flatten(-2) if self.interleaved else torch.cat([gate, up], dim=-1)


LAYOUTS = tuple(FusedLayout(t, i) for t in (False, True) for i in (False, True))


class FusedStorage(NamedTuple):
    """How a checkpoint stores experts it holds fused: the layout and each fused tensor's shape."""

    layout: FusedLayout
    shapes: dict[str, tuple[int, ...]]


class ModelGate:
    """The fused module's own gating (gpt-oss's clamped SwiGLU, ``_apply_gate``) on one expert's
    gate and up outputs: its code, run on a copy of the module that holds none of its weights."""

    def __init__(self, fused: nn.Module, layout: FusedLayout):
        self.gating = copy.copy(fused)
        self.gating._parameters = {}  # the shallow copy must not hold on to every expert's weights
        self.layout = layout

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.gating._apply_gate(self.layout.join_last(gate, up))


class Expert(nn.Module):
    """One expert's MLP, down(act(gate(x)) * up(x)) (or down(act(up(x))) without a gate, or the
    model's own gating of gate(x) and up(x)), its projections as nn.Linear."""

    def __init__(
        self, hidden: int, intermediate: int, act_fn: nn.Module | None, names: ExpertNames,
        device=None, dtype=None, bias: bool = False, gate_fn: ModelGate | None = None,
    ):  # fmt: skip
        super().__init__()
        self.names = names
        self.act_fn = act_fn
        self.gate_fn = gate_fn
        for name, shape in ((names.gate, (hidden, intermediate)), (names.up, (hidden, intermediate)),
                            (names.down, (intermediate, hidden))):  # fmt: skip
            if name is not None:
                setattr(self, name, nn.Linear(*shape, bias=bias, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.names
        up = getattr(self, n.up)(x)
        if n.gate is None:
            hidden = self.act_fn(up)
        elif self.gate_fn is not None:
            hidden = self.gate_fn(getattr(self, n.gate)(x), up)
        else:
            hidden = self.act_fn(getattr(self, n.gate)(x)) * up
        return getattr(self, n.down)(hidden)


# The token rows (of the block's flattened input) the expert running now was given, when routed.
_ROUTED_TOKENS: ContextVar[torch.Tensor | None] = ContextVar("routed_tokens", default=None)


def routed_tokens() -> torch.Tensor | None:
    """Inside a routed expert's forward, the (ascending) token rows it runs on; else None."""
    return _ROUTED_TOKENS.get()


class LinearExperts(nn.ModuleList):
    """The experts of one MoE block as ``Expert`` modules, called as the fused module is.

    ``fused``: where checkpoints of the model type store the fused tensors (no per-expert names
    for transformers to merge: gpt-oss), their layout and stored shapes; a streamed run reads them
    and splits them per expert, and the fake format writes them back fused.
    """

    def __init__(
        self,
        experts: list[Expert],
        every_token: bool = False,
        fused: FusedStorage | None = None,
    ):
        super().__init__(experts)
        self.every_token = every_token
        self.fused = fused

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if top_k_index is None:
            return self._stacked(hidden_states)
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if self.every_token:
                y = expert(hidden_states)[token]  # every token through the expert; only the routed ones add up
            elif token.numel():
                y = _run_routed(expert, hidden_states, token)
            else:
                continue
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def _stacked(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Llama-4's convention: [E * T, H], expert e's inputs the e-th T rows, each token already
        weighted by its router score, zero where not routed. An expert runs on its rows that are
        not zero (bias-free experts give 0 for 0), so ``every_token`` has nothing to add here."""
        per_expert = hidden_states.view(len(self), -1, hidden_states.shape[-1])
        out = torch.zeros_like(per_expert)
        for index, (expert, x) in enumerate(zip(self, per_expert)):
            token = x.any(dim=-1).nonzero().squeeze(1)
            if token.numel():
                out[index, token] = _run_routed(expert, x, token).to(out.dtype)
        return out.view_as(hidden_states)


def _run_routed(expert: Expert, hidden_states: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``expert`` on the rows ``token`` of ``hidden_states``, telling statistics which rows they are."""
    entered = _ROUTED_TOKENS.set(token)
    try:
        return expert(hidden_states[token])
    finally:
        _ROUTED_TOKENS.reset(entered)


def _fused_parameters(fused: nn.Module) -> dict[str, torch.Tensor]:
    """The fused module's own tensors by name: the projections and their biases, if any."""
    return {name: p for name, p in fused.named_parameters(recurse=False)}


def split_experts(tensors: dict[str, torch.Tensor], layout: FusedLayout, names: ExpertNames) -> dict[str, torch.Tensor]:
    """Per-expert weights and biases (``3.gate_proj.weight``) from the fused tensors."""
    gated = "gate_up_proj" in tensors
    split: dict[str, torch.Tensor] = {}
    for suffix, kind in (("", "weight"), ("_bias", "bias")):
        parts: dict[str | None, torch.Tensor] = {}
        if f"down_proj{suffix}" not in tensors:
            continue
        parts[names.down] = layout.rows(tensors[f"down_proj{suffix}"])
        if gated:
            parts[names.gate], parts[names.up] = layout.split(layout.rows(tensors[f"gate_up_proj{suffix}"]))
        else:
            parts[names.up] = layout.rows(tensors[f"up_proj{suffix}"])
        for projection, stacked in parts.items():
            for e in range(stacked.shape[0]):
                split[f"{e}.{projection}.{kind}"] = stacked[e]
    return split


def join_experts(
    tensors: dict[str, torch.Tensor], layout: FusedLayout, names: ExpertNames, n: int
) -> dict[str, torch.Tensor]:
    """The fused tensors from per-expert weights and biases (the inverse of ``split_experts``)."""
    joined = {}
    for suffix, kind in (("", "weight"), ("_bias", "bias")):
        if f"0.{names.down}.{kind}" not in tensors:
            continue
        projections = [p for p in (names.gate, names.up, names.down) if p is not None]
        stacked = {p: torch.stack([tensors[f"{e}.{p}.{kind}"] for e in range(n)]) for p in projections}
        joined[f"down_proj{suffix}"] = layout.stored(stacked[names.down])
        if names.gate is None:
            joined[f"up_proj{suffix}"] = layout.stored(stacked[names.up])
        else:
            joined[f"gate_up_proj{suffix}"] = layout.stored(layout.join(stacked[names.gate], stacked[names.up]))
    return joined


def experts_fused_back(block: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (a block's float weights, named ``prefix`` + name) with the per-expert weights of
    experts whose checkpoints hold them fused put back fused, so transformers loads them."""
    tensors = dict(tensors)
    for name, experts in block.named_modules():
        if isinstance(experts, LinearExperts) and experts.fused is not None:
            head = f"{prefix}{name}."
            own = {key.removeprefix(head): tensors.pop(key) for key in list(tensors) if key.startswith(head)}
            joined = join_experts(own, experts.fused.layout, experts[0].names, len(experts))
            tensors |= {head + key: value.contiguous() for key, value in joined.items()}
    return dict(sorted(tensors.items()))


def linear_experts(
    fused: nn.Module, names: ExpertNames, layout: FusedLayout = FusedLayout(), stored_fused: bool = False
) -> LinearExperts:
    """``fused``'s experts as linears holding the same weights (copies; meta stays meta)."""
    tensors = _fused_parameters(fused)
    gated = "gate_up_proj" in tensors
    names = names if gated else ExpertNames(None, names.up, names.down)
    down = layout.rows(tensors["down_proj"])
    n_experts, hidden, intermediate = down.shape
    gate_fn = ModelGate(fused, layout) if gated and hasattr(fused, "_apply_gate") else None
    act_fn = getattr(fused, "act_fn", None)
    bias = "down_proj_bias" in tensors
    experts = [Expert(hidden, intermediate, act_fn, names, down.device, down.dtype, bias, gate_fn)
               for _ in range(n_experts)]  # fmt: skip
    if down.device.type != "meta":
        with torch.no_grad():
            for name, tensor in split_experts(tensors, layout, names).items():
                index, rest = name.split(".", 1)
                experts[int(index)].get_parameter(rest).copy_(tensor)
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    return LinearExperts(experts, fused=FusedStorage(layout, shapes) if stored_fused else None)


def linearize_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` by ``LinearExperts``; returns how many.

    A model type in ``EXPERT_NAMES`` converts by its names and the plain layout. Any other takes
    the names transformers merges from its checkpoints (``stored_expert_names``) and the layout in
    which a random-weight copy of its fused module and the converted experts compute the same on
    random routed tokens; a fused module no layout reproduces (another forward) is an error rather
    than experts left float or computed wrong.
    """
    found = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    if not found:
        return 0
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    stored = EXPERT_NAMES.get(model_type) or stored_expert_names(model)
    names = stored or ExpertNames()
    layout = FusedLayout() if model_type in EXPERT_NAMES else _layout_that_converts(found[0][1], names)
    if layout is None:
        raise UnsupportedModelError(
            f"{model_type!r} keeps fused mixture-of-experts weights that per-expert linears do not reproduce in any "
            f"layout awqkit knows (another activation or forward); awqkit quantizes experts that they do"
        )
    for name, module in found:
        parent_name, _, attribute = name.rpartition(".")
        # No per-expert names for transformers to merge: checkpoints hold the fused tensors.
        setattr(model.get_submodule(parent_name), attribute, linear_experts(module, names, layout, stored is None))
    return len(found)


def stored_expert_names(model: nn.Module) -> ExpertNames | None:
    """The per-expert projection names checkpoints of ``model``'s type store, read from the
    conversions transformers merges them by (``experts.*.w1.weight`` and ``experts.*.w3.weight``
    into ``experts.gate_up_proj``; ``experts.*.w2.weight`` into ``experts.down_proj``); None
    where transformers merges none (the checkpoints store the fused tensors, or no experts)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    found: dict[str, list[str | None]] = {}
    for conversion in get_model_conversion_mapping(model, add_legacy=False):
        if isinstance(conversion, WeightConverter) and len(conversion.target_patterns) == 1:
            target = conversion.target_patterns[0].rsplit(".", 1)[-1]
            found[target] = [_per_expert_name(source) for source in conversion.source_patterns]
    gate_up, up, down = found.get("gate_up_proj", []), found.get("up_proj", []), found.get("down_proj", [])
    if len(gate_up) == 2 and len(down) == 1 and None not in (*gate_up, *down):
        return ExpertNames(gate_up[0], gate_up[1], down[0])
    if len(up) == 1 and len(down) == 1 and None not in (*up, *down):  # experts without a gate
        return ExpertNames(None, up[0], down[0])
    return None


def _per_expert_name(pattern: str) -> str | None:
    found = re.search(r"experts\.\*\.(\w+)\.weight$", pattern)
    return found[1] if found else None


def _layout_that_converts(fused: nn.Module, names: ExpertNames, tokens: int = 16) -> FusedLayout | None:
    """The layout in which ``linear_experts`` computes what ``fused`` computes on random weights
    and routing, if any: the fused module's own forward is the reference."""
    if not isinstance(getattr(fused, "act_fn", None), nn.Module) and not hasattr(fused, "_apply_gate"):
        return None  # another activation scheme
    probe = random_copy(fused)
    tensors = _fused_parameters(probe)
    g = torch.Generator().manual_seed(0)
    matching = []
    for layout in LAYOUTS:
        n_experts, hidden, _ = layout.rows(tensors["down_proj"]).shape
        up = tensors.get("gate_up_proj", tensors.get("up_proj"))
        if layout.rows(up).shape[2] != hidden:
            continue
        for call in _expert_calls(n_experts, hidden, tokens, g):
            try:
                with torch.no_grad():
                    expected = probe(*call)
                    got = linear_experts(probe, names, layout)(*call)
            except (TypeError, ValueError, RuntimeError, IndexError):  # another signature or layout
                continue
            if torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())):
                matching.append(layout)
                break
    # The model's own gating sees gate and up joined back as stored, so any split computes the
    # same: the gate is the half whose zero zeroes the output (act(0) = 0: SiLU, GELU, ReLU).
    if hasattr(fused, "_apply_gate") and "gate_up_proj" in tensors:
        matching.sort(key=lambda layout: not _zero_gate_is_zero(probe, layout, g))
    return matching[0] if matching else None


def _expert_calls(n_experts: int, hidden: int, tokens: int, g: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """Random arguments for both ways transformers calls fused experts: tokens with their top-k
    experts and weights; or (Llama-4) every expert's copy of the tokens stacked, routing-weighted,
    about half of them zero (not routed)."""
    x = torch.randn(tokens, hidden, generator=g)
    top_k = min(2, n_experts)
    index = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    stacked = torch.randn(n_experts * tokens, hidden, generator=g)
    routed = torch.rand(n_experts * tokens, 1, generator=g) < 0.5
    return [(x, index, weights), (stacked * routed,)]


def _zero_gate_is_zero(fused: nn.Module, layout: FusedLayout, g: torch.Generator) -> bool:
    up = torch.randn(4, layout.rows(fused.down_proj).shape[2], generator=g)
    with torch.no_grad():
        return bool(fused._apply_gate(layout.join_last(torch.zeros_like(up), up)).abs().max() == 0)


def router_parameters(module: nn.Module) -> set[int]:
    """ids of the parameters of MoE routers inside ``module``: the children of a block holding
    ``LinearExperts`` that own a weight and are not nn.Linear (``mlp.gate``; not Qwen2-MoE's
    shared expert, an MLP of linears), or are one with a row per expert (Phi-MoE's router, an
    nn.Linear subclass whose weight its forward reads). They stay float by design."""
    found = set()
    for parent in module.modules():
        children = list(parent.children())
        experts = next((child for child in children if isinstance(child, LinearExperts)), None)
        for child in children if experts is not None else ():
            if isinstance(child, LinearExperts):
                continue
            if not isinstance(child, nn.Linear) or child.out_features == len(experts):
                found |= {id(p) for p in child.parameters(recurse=False)}
    return found


def router_names(model: nn.Module) -> list[str]:
    """The qualified names of the MoE routers in ``model`` (left float; listed as ignored)."""
    ids = router_parameters(model)
    return sorted(name for name, m in model.named_modules() if any(id(p) in ids for p in m.parameters(recurse=False)))


def has_experts(model: nn.Module) -> bool:
    return any(isinstance(m, LinearExperts) for m in model.modules())


def set_every_token(module: nn.Module, every_token: bool) -> None:
    """Whether the ``LinearExperts`` inside ``module`` run every token through every expert."""
    for child in module.modules():
        if isinstance(child, LinearExperts):
            child.every_token = every_token
