"""Every weight matrix of a block as an nn.Linear, and back to the form its checkpoint stores.

awqkit's walk, search and formats work on nn.Linear. Two kinds of modules hold the same function
in another form: transformers' fused mixture-of-experts tensors (``awqkit.model.experts``) and
GPT-2's ``Conv1D``, a linear whose weight is stored transposed, [in, out]. Both are replaced by
nn.Linear modules computing the same; the streamed reader gives them their checkpoint tensors in
that form, and the fake format (float weights) writes them back as the checkpoint stored them, so
transformers loads the output with the input's classes.
"""

from __future__ import annotations

import torch
from torch import nn

from awqkit.model.experts import experts_fused_back, linearize_experts


class TransposedLinear(nn.Linear):
    """A GPT-2 ``Conv1D`` as nn.Linear: the same function; its checkpoint stores ``weight`` [in, out]."""


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linearize(model: nn.Module) -> None:
    """Replace fused experts and GPT-2 ``Conv1D`` modules of ``model`` by nn.Linear (meta stays meta)."""
    linearize_experts(model)
    for name, conv in [(n, m) for n, m in model.named_modules() if _is_conv1d(m)]:
        weight = conv.weight
        linear = TransposedLinear(conv.nx, conv.nf, bias=True, device=weight.device, dtype=weight.dtype)
        if weight.device.type != "meta":
            with torch.no_grad():
                linear.weight.copy_(weight.T)
                linear.bias.copy_(conv.bias)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, linear)


def transposed_weights(module: nn.Module) -> set[str]:
    """The names of the weights ``module`` holds as the transpose of what its checkpoint stores."""
    return {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, TransposedLinear)}


def as_stored(block: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A block's float tensors (named ``prefix`` + name) in the form its checkpoint stores them:
    fused experts fused again, Conv1D weights transposed back."""
    tensors = experts_fused_back(block, prefix, tensors)
    for name in transposed_weights(block):
        tensors[prefix + name] = tensors[prefix + name].T.contiguous()
    return tensors
