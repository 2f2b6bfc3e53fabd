"""Which linears share one input and where their shared scales fold: architectures as data.

A ``ScaleGroup`` names the linears reading one tensor and the op producing it; ``ARCHITECTURES``
lists them per model type (the fast path; other types' groups are found from the block by
awqkit.model.discover), and ``Architecture.groups`` adds a mixture-of-experts block's groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from awqkit.model.experts import EXPERT_NAMES, ExpertNames, LinearExperts
from awqkit.model.layout import block_linears

# Linears whose groups are never clipped: AutoAWQ skips the query and key projections, whose
# errors the softmax amplifies.
UNCLIPPED = ("q_proj", "k_proj")


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one tensor, and the op whose output that tensor is.

    Shared AWQ scales s multiply the columns of every ``balance`` linear, and 1/s folds into
    ``smooth`` (a norm's weight, or a linear's output rows), so the model computes the same
    function and the stored weights are exactly Q(W * s). ``module`` is the submodule whose output
    the module objective compares (the attention block for q, k, v); None means the linear itself.
    A group with no ``smooth`` has nowhere to fold: per-linear scales are groups of one such linear.
    """

    smooth: str | None
    balance: tuple[str, ...]
    module: str | None = None
    # Other readers of the same tensor that stay float (a MoE router): their columns are multiplied
    # by s too, so that they compute the same function after the fold.
    compensate: tuple[str, ...] = ()
    # The rows [start, stop) of a fused ``smooth`` linear that make the balance input (Phi-3's
    # down_proj reads act(gate) * up, up being the second half of gate_up_proj's rows); None: all.
    smooth_rows: tuple[int, int] | None = None

    @property
    def folds_into(self) -> str | None:
        """Where 1/s goes, as records name it (``mlp.gate_up_proj[96:192]`` for part of a linear)."""
        if self.smooth is None or self.smooth_rows is None:
            return self.smooth
        return f"{self.smooth}[{self.smooth_rows[0]}:{self.smooth_rows[1]}]"


@dataclass(frozen=True)
class ExpertGroups:
    """Where a mixture-of-experts MLP's scales fold: one s shared by every expert's gate and up
    (they all read the MLP norm's output, as does the router, which is compensated), and per expert
    an s for down folded into that expert's up rows (AutoAWQ's and llm-compressor's mappings)."""

    norm: str
    names: ExpertNames
    mlp: str = "mlp"
    # Qwen2-MoE: a dense MLP beside the experts reading the same input, and its float sigmoid gate
    shared_expert: str | None = None
    shared_expert_gate: str | None = None

    def groups(self, n_experts: int) -> tuple[ScaleGroup, ...]:
        experts = [f"{self.mlp}.experts.{e}" for e in range(n_experts)]
        gate_up = [f"{x}.{p}" for x in experts for p in (self.names.gate, self.names.up)]
        compensate = [f"{self.mlp}.gate"]
        shared = []
        if self.shared_expert:
            dense = f"{self.mlp}.{self.shared_expert}"
            gate_up += [f"{dense}.gate_proj", f"{dense}.up_proj"]
            compensate += [f"{self.mlp}.{self.shared_expert_gate}"] if self.shared_expert_gate else []
            shared = [ScaleGroup(f"{dense}.up_proj", (f"{dense}.down_proj",))]
        return (
            ScaleGroup(self.norm, tuple(gate_up), self.mlp, compensate=tuple(compensate)),
            *shared,
            *(ScaleGroup(f"{x}.{self.names.up}", (f"{x}.{self.names.down}",)) for x in experts),
        )


@dataclass(frozen=True)
class Architecture:
    scale_groups: tuple[ScaleGroup, ...]
    # Gemma's RMSNorm multiplies by (1 + weight), Llama's by weight.
    norm_offset: float = 0.0
    # Mixture-of-experts blocks: their MLP's groups (blocks with a dense MLP use scale_groups).
    experts: ExpertGroups | None = None

    def groups(self, block: nn.Module) -> tuple[ScaleGroup, ...]:
        """The scale groups of ``block``: with experts, the attention groups and the experts'."""
        experts = getattr(block.get_submodule(self.experts.mlp), "experts", None) if self.experts else None
        if not isinstance(experts, LinearExperts):
            return self.scale_groups
        attention = tuple(g for g in self.scale_groups if not g.balance[0].startswith(self.experts.mlp + "."))
        return (*attention, *self.experts.groups(len(experts)))

    @property
    def modules(self) -> list[str]:
        """The submodules the module objective compares (attention, MLP)."""
        return [group.module for group in self.scale_groups if group.module]


def _llama_like(mlp_norm: str) -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        # Fits only when v_proj's outputs are o_proj's inputs one to one (no grouped-query attention).
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        # down_proj reads act(gate) * up, which is linear in up_proj's output rows.
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    )


ARCHITECTURES: dict[str, Architecture] = {
    **{t: Architecture(_llama_like("post_attention_layernorm")) for t in ("llama", "mistral", "qwen2", "qwen3")},
    **{
        t: Architecture(
            _llama_like("post_attention_layernorm"), experts=ExpertGroups("post_attention_layernorm", EXPERT_NAMES[t])
        )
        for t in ("mixtral", "qwen3_moe")
    },
    "qwen2_moe": Architecture(
        _llama_like("post_attention_layernorm"),
        experts=ExpertGroups(
            "post_attention_layernorm",
            EXPERT_NAMES["qwen2_moe"],
            shared_expert="shared_expert",
            shared_expert_gate="shared_expert_gate",
        ),
    ),  # fmt: skip
    **{t: Architecture(_llama_like("pre_feedforward_layernorm"), norm_offset=1.0) for t in ("gemma3", "gemma3_text")},
}


def architecture_of(model: nn.Module) -> Architecture | None:
    """Where shared scales fold, from the table for the model type; None for a type the table does
    not list (its groups are then found from the block: awqkit.model.discover)."""
    return ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))


def per_linear_groups(block: nn.Module) -> tuple[ScaleGroup, ...]:
    """Each linear its own scale group, folding nowhere: the per-linear (research) form."""
    return tuple(ScaleGroup(None, (name,)) for name in block_linears(block))


def foldable(group: ScaleGroup, block: nn.Module) -> bool:
    """Whether 1/s fits into ``smooth``: a linear's output rows must be the balance inputs one to one."""
    if group.smooth is None:
        return False
    smooth = block.get_submodule(group.smooth)
    width = block.get_submodule(group.balance[0]).in_features
    rows = group.smooth_rows[1] - group.smooth_rows[0] if group.smooth_rows else getattr(smooth, "out_features", 0)
    return not isinstance(smooth, nn.Linear) or rows == width
