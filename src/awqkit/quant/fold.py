"""How shared scales s move into the model without changing what it computes.

The balance linears' columns are multiplied by s and the op that produces their input is divided
by s: a norm's weight (Gemma's (1 + weight) form included) or a linear's output rows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from awqkit.model.scale_groups import ScaleGroup


@torch.no_grad()
def divide_output(
    smooth: nn.Module, s: torch.Tensor, norm_offset: float = 0.0, rows: tuple[int, int] | None = None
) -> None:
    """Make ``smooth`` produce its old output divided by s, channel by channel (a linear's ``rows``
    only, when given)."""
    if isinstance(smooth, nn.Linear):
        part = slice(*rows) if rows else slice(None)
        smooth.weight[part].div_(s[:, None].to(smooth.weight.dtype))
        if smooth.bias is not None:
            smooth.bias[part].div_(s.to(smooth.bias.dtype))
        return
    weight = getattr(smooth, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
        raise ValueError(
            f"cannot fold scales into {type(smooth).__name__}: expected a per-channel weight of shape {tuple(s.shape)}"
        )
    # output = normed(x) * (offset + weight): dividing by s means (offset + weight') = (offset + weight) / s.
    weight.copy_(((norm_offset + weight.double()) / s.double() - norm_offset).to(weight.dtype))
    bias = getattr(smooth, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))


def fold_normalizer(smooth: nn.Module, s: torch.Tensor, norm_offset: float = 0.0) -> float:
    """The constant to divide s by before folding, so the folded weights stay representable.

    Min-max group quantization is scale-equivariant: W * s / c has the same integers as W * s,
    with group scales divided by c. So c changes nothing in exact arithmetic, only where the
    stored numbers land. A plain norm or a linear's rows get c = sqrt(max(s) min(s)), as AutoAWQ
    divides: s / c spans [1/r, r] around 1, so neither weight / s nor the fp16 AWQ scales
    overflow where s spans many decades (dead channels at 1e-5 next to loud ones). A norm that
    multiplies by (offset + weight), Gemma's, gets c = max(s): s / c <= 1, so the folded
    (1 + weight) / s - 1 never approaches -1, where bf16 keeps 8 bits and would erase it.
    """
    if norm_offset and not isinstance(smooth, nn.Linear):
        return float(s.max())
    return math.sqrt(float(s.max()) * float(s.min()))


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Scale the balance linears' (and compensated readers') columns by s and fold 1/s into the
    smooth op: the same function."""
    divide_output(block.get_submodule(group.smooth), s, norm_offset, group.smooth_rows)
    for name in (*group.balance, *group.compensate):
        weight = block.get_submodule(name).weight
        weight.mul_(s[None, :].to(weight.dtype))
