"""Where a causal LM keeps its decoder blocks and which of their linears get quantized.

Found generically (the largest ModuleList of identical blocks under the decoder), not from a
hand-written table per model type.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from awqkit.errors import UnsupportedModelError
from awqkit.model.experts import router_names, router_parameters

SUPPORTED = (
    "decoder-only models whose blocks use nn.Linear (or GPT-2's Conv1D, or fused experts per-expert linears "
    "reproduce), with convolutions and state-space parameters kept float"
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
    if not any(isinstance(m, nn.Linear) for m in block.modules()):
        raise UnsupportedModelError(f"{model_name} has no nn.Linear in its decoder blocks; supported: {SUPPORTED}")
    # A matrix outside nn.Linear (transformers' fused mixture-of-experts weights) would stay float
    # while the rest is quantized: refuse rather than half-quantize.
    in_linears = {id(p) for m in block.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    in_linears |= router_parameters(block)  # MoE routers stay float by design
    in_linears |= {id(p) for m in block.modules() if isinstance(m, CONVOLUTIONS) for p in m.parameters()}
    others = [
        name for name, p in block.named_parameters()
        if p.dim() >= 2 and id(p) not in in_linears and name.rsplit(".", 1)[-1] not in STATE_SPACE_PARAMETERS
    ]  # fmt: skip
    if others:
        raise UnsupportedModelError(
            f"{model_name}'s blocks hold weight matrices outside nn.Linear ({', '.join(others[:3])}), "
            f"such as fused mixture-of-experts weights, which awqkit does not quantize yet; supported: {SUPPORTED}"
        )


# Convolutions inside blocks (LFM2's and Mamba's short convolutions) stay float, as every other
# parameter that is not a linear's: their weights are a sliver of the block's.
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)
# A state-space mixer's own parameters (Mamba's A_log is a matrix), float too.
STATE_SPACE_PARAMETERS = ("A_log", "D", "dt_bias")

# Linears inside blocks that stay float: Qwen2-MoE's one-output sigmoid gate of its shared expert;
# Mamba's time-step projection, whose weight the mixer's kernels read without calling it, so a
# packed form of it would leave them no weight to read.
FLOAT_LINEARS = ("shared_expert_gate", "dt_proj")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of one block that gets quantized, by name relative to the block, in module
    order: not the MoE routers (an nn.Linear in some models) nor ``FLOAT_LINEARS``."""
    routers = router_parameters(block)
    return {
        name: m for name, m in block.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in FLOAT_LINEARS and id(m.weight) not in routers
    }  # fmt: skip


def float_linears(model: nn.Module) -> list[str]:
    """The linears outside the decoder blocks (lm_head), the MoE routers and the linears blocks keep
    float (Qwen2-MoE's shared-expert gate): left float, so listed as ignored (vLLM builds the
    routers as linears)."""
    blocks = find_decoder(model).blocks_name + "."
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kept = [n for n in linears if not n.startswith(blocks) or n.rsplit(".", 1)[-1] in FLOAT_LINEARS]
    return sorted([*kept, *router_names(model)])


def linear_classes(model: nn.Module) -> tuple[str, ...]:
    """The class names of the quantized linears, ``Linear`` first: loaders of compressed-tensors
    match modules by class name, and a subclass (Falcon's ``FalconLinear``) is not ``Linear``."""
    names = {type(m).__name__ for block in find_decoder(model).blocks for m in block_linears(block).values()}
    return ("Linear", *sorted(names - {"Linear"}))
