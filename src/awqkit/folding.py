"""How shared scales s move into the model without changing what it computes.

The balance linears' columns are multiplied by s and the op that produces their input is divided
by s: a norm's weight (Gemma's (1 + weight) form included) or a linear's output rows.
"""

from __future__ import annotations

import torch
from torch import nn

from awqkit.architectures import ScaleGroup


@torch.no_grad()
def divide_output(smooth: nn.Module, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Make ``smooth`` produce its old output divided by s, channel by channel."""
    if isinstance(smooth, nn.Linear):
        smooth.weight.div_(s[:, None].to(smooth.weight.dtype))
        if smooth.bias is not None:
            smooth.bias.div_(s.to(smooth.bias.dtype))
        return
    weight = getattr(smooth, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
        raise ValueError(f"cannot fold scales into {type(smooth).__name__}: expected a per-channel weight of shape {tuple(s.shape)}")
    # output = normed(x) * (offset + weight): dividing by s means (offset + weight') = (offset + weight) / s.
    weight.copy_(((norm_offset + weight.double()) / s.double() - norm_offset).to(weight.dtype))
    bias = getattr(smooth, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Scale the balance linears' columns by s and fold 1/s into the smooth op: same function."""
    divide_output(block.get_submodule(group.smooth), s, norm_offset)
    for name in group.balance:
        linear = block.get_submodule(name)
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))
