"""Where a causal LM keeps its decoder blocks and which linears inside them get quantized.

Found generically (the largest ModuleList of identical blocks under the decoder), not from a
hand-written table per model type; tested on Llama, Mistral, Qwen2, Qwen3 and Gemma3.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from awqkit.errors import UnsupportedModelError
from awqkit.experts import EXPERT_NAMES, ExpertNames, LinearExperts, router_parameters

SUPPORTED = (
    "decoder-only models whose blocks use nn.Linear (Llama, Mistral, Qwen2, Qwen3, Gemma3) or fused experts "
    "awqkit knows (Mixtral, Qwen2-MoE, Qwen3-MoE)"
)


@dataclass(frozen=True)
class DecoderLayout:
    decoder: nn.Module  # embeds tokens and runs the blocks (``model.model`` for Llama)
    blocks: nn.ModuleList
    blocks_name: str  # qualified name of ``blocks`` inside the full model
    decoder_name: str  # qualified name of ``decoder`` inside the full model ("" when it is the model)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_decoder(model: nn.Module) -> DecoderLayout:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", model)
    stacks = [
        (name, module)
        for name, module in decoder.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
        and _num_params(module) > 0
    ]
    if not stacks:
        raise UnsupportedModelError(f"no decoder blocks found in {type(model).__name__}; supported: {SUPPORTED}")
    name, blocks = max(stacks, key=lambda item: _num_params(item[1]))
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    _check_block(blocks[0], type(model).__name__)
    return DecoderLayout(decoder, blocks, ".".join(p for p in (prefix, name) if p), prefix)


def _check_block(block: nn.Module, model_name: str) -> None:
    kinds = {type(m).__name__ for m in block.modules()}
    if "Conv1D" in kinds:
        raise UnsupportedModelError(
            f"{model_name} stores its projections as GPT-2-style Conv1D, which awqkit does not quantize; "
            f"supported: {SUPPORTED}"
        )
    if not any(isinstance(m, nn.Linear) for m in block.modules()):
        raise UnsupportedModelError(f"{model_name} has no nn.Linear in its decoder blocks; supported: {SUPPORTED}")
    # A matrix outside nn.Linear (transformers' fused mixture-of-experts weights) would stay float
    # while the rest is quantized: refuse rather than half-quantize.
    in_linears = {id(p) for m in block.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    in_linears |= router_parameters(block)  # MoE routers stay float by design
    others = [name for name, p in block.named_parameters() if p.dim() >= 2 and id(p) not in in_linears]
    if others:
        raise UnsupportedModelError(
            f"{model_name}'s blocks hold weight matrices outside nn.Linear ({', '.join(others[:3])}), "
            f"such as fused mixture-of-experts weights, which awqkit does not quantize yet; supported: {SUPPORTED}"
        )


# Linears inside blocks that stay float: Qwen2-MoE's one-output sigmoid gate of its shared expert.
FLOAT_LINEARS = ("shared_expert_gate",)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of one block that gets quantized, by name relative to the block, in module order."""
    return {
        name: m for name, m in block.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in FLOAT_LINEARS
    }  # fmt: skip


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
        t: Architecture(_llama_like("post_attention_layernorm"), experts=ExpertGroups("post_attention_layernorm", EXPERT_NAMES[t]))
        for t in ("mixtral", "qwen3_moe")
    },
    "qwen2_moe": Architecture(
        _llama_like("post_attention_layernorm"),
        experts=ExpertGroups("post_attention_layernorm", EXPERT_NAMES["qwen2_moe"], shared_expert="shared_expert",
                             shared_expert_gate="shared_expert_gate"),
    ),  # fmt: skip
    **{t: Architecture(_llama_like("pre_feedforward_layernorm"), norm_offset=1.0) for t in ("gemma3", "gemma3_text")},
}


def architecture_of(model: nn.Module) -> Architecture:
    """Where shared scales fold, from the model type: needed for ``--scales shared``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"shared scales need to know where scales fold, which awqkit knows for {', '.join(sorted(ARCHITECTURES))}, "
            f"not {model_type!r}; use --scales per-linear"
        )
    return ARCHITECTURES[model_type]


def per_linear_groups(block: nn.Module) -> tuple[ScaleGroup, ...]:
    """Each linear its own scale group, folding nowhere: the per-linear (research) form."""
    return tuple(ScaleGroup(None, (name,)) for name in block_linears(block))


def foldable(group: ScaleGroup, block: nn.Module) -> bool:
    """Whether 1/s fits into ``smooth``: a linear's output rows must be the balance inputs one to one."""
    if group.smooth is None:
        return False
    smooth = block.get_submodule(group.smooth)
    width = block.get_submodule(group.balance[0]).in_features
    return not isinstance(smooth, nn.Linear) or smooth.out_features == width
