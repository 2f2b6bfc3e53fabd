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
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from awqkit.errors import UnsupportedModelError
from awqkit.model.probing import random_copy


@dataclass(frozen=True)
class ExpertNames:
    """What a model's checkpoints call an expert's projections."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


# model_type -> the projection names of its experts (architectures as data)
EXPERT_NAMES = {
    "mixtral": ExpertNames("w1", "w3", "w2"),
    "qwen2_moe": ExpertNames(),
    "qwen3_moe": ExpertNames(),
}


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts: 3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3


class Expert(nn.Module):
    """One expert's MLP, down(act(gate(x)) * up(x)), its projections as nn.Linear."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, names: ExpertNames, device=None, dtype=None):
        super().__init__()
        self.names = names
        self.act_fn = act_fn
        for name, shape in ((names.gate, (hidden, intermediate)), (names.up, (hidden, intermediate)),
                            (names.down, (intermediate, hidden))):  # fmt: skip
            setattr(self, name, nn.Linear(*shape, bias=False, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.names
        return getattr(self, n.down)(self.act_fn(getattr(self, n.gate)(x)) * getattr(self, n.up)(x))


# The token rows (of the block's flattened input) the expert running now was given, when routed.
_ROUTED_TOKENS: ContextVar[torch.Tensor | None] = ContextVar("routed_tokens", default=None)


def routed_tokens() -> torch.Tensor | None:
    """Inside a routed expert's forward, the (ascending) token rows it runs on; else None."""
    return _ROUTED_TOKENS.get()


class LinearExperts(nn.ModuleList):
    """The experts of one MoE block as ``Expert`` modules, called as the fused module is."""

    def __init__(self, experts: list[Expert], every_token: bool = False):
        super().__init__(experts)
        self.every_token = every_token

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if self.every_token:
                y = expert(hidden_states)[token]  # every token through the expert; only the routed ones add up
            elif token.numel():
                entered = _ROUTED_TOKENS.set(token)  # so statistics know which tokens these are
                try:
                    y = expert(hidden_states[token])
                finally:
                    _ROUTED_TOKENS.reset(entered)
            else:
                continue
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def linear_experts(fused: nn.Module, names: ExpertNames) -> LinearExperts:
    """``fused``'s experts as linears holding the same weights (copies; meta stays meta)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    n_experts, two_i, hidden = gate_up.shape
    intermediate = two_i // 2
    experts = []
    for e in range(n_experts):
        expert = Expert(hidden, intermediate, fused.act_fn, names, device=gate_up.device, dtype=gate_up.dtype)
        if gate_up.device.type != "meta":
            with torch.no_grad():
                getattr(expert, names.gate).weight.copy_(gate_up[e, :intermediate])
                getattr(expert, names.up).weight.copy_(gate_up[e, intermediate:])
                getattr(expert, names.down).weight.copy_(down[e])
        experts.append(expert)
    return LinearExperts(experts)


def linearize_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` by ``LinearExperts``; returns how many.

    A model type in ``EXPERT_NAMES`` converts by its names. Any other converts with the usual
    names (``experts.3.gate_proj``) only where a random-weight copy of its fused module and of the
    converted experts compute the same on random routed tokens; a fused module that differs (biases,
    a clamped activation, another layout) is an error rather than experts left float or computed
    wrong.
    """
    found = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    if not found:
        return 0
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = EXPERT_NAMES.get(model_type, ExpertNames())
    if model_type not in EXPERT_NAMES and not _converts_exactly(found[0][1], names):
        raise UnsupportedModelError(
            f"{model_type!r} keeps fused mixture-of-experts weights that per-expert gate, up and down linears do "
            f"not reproduce (biases, another activation or layout); awqkit quantizes experts that they do"
        )
    for name, module in found:
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, linear_experts(module, names))
    return len(found)


def _converts_exactly(fused: nn.Module, names: ExpertNames, tokens: int = 16) -> bool:
    """Whether ``linear_experts`` computes what ``fused`` computes, on random weights and routing."""
    if not isinstance(getattr(fused, "act_fn", None), nn.Module):  # another activation scheme
        return False
    probe = random_copy(fused)
    n_experts, _, hidden = probe.gate_up_proj.shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g)
    top_k = min(2, n_experts)
    index = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    try:
        with torch.no_grad():
            expected = probe(x, index, weights)
            got = linear_experts(probe, names)(x, index, weights)
    except (TypeError, ValueError, RuntimeError):  # another signature or layout
        return False
    return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())))


def router_parameters(module: nn.Module) -> set[int]:
    """ids of the parameters of MoE routers inside ``module``: the children of a block holding
    ``LinearExperts`` that own a weight and are not nn.Linear (``mlp.gate``; not Qwen2-MoE's
    shared expert, an MLP of linears). They stay float by design."""
    found = set()
    for parent in module.modules():
        children = list(parent.children())
        if any(isinstance(child, LinearExperts) for child in children):
            for child in children:
                if not isinstance(child, (LinearExperts, nn.Linear)):
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
