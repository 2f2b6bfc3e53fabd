"""Copies of modules with random weights, for probing what a module computes without its weights
(a streamed model's are on the meta device)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def random_copy(block: nn.Module, seed: int = 0) -> nn.Module:
    """``block`` in float32 on the CPU with random weights (a streamed block's are on the meta
    device): linear weights ~ N(0, 1/in), vectors (norm weights, biases) uniform in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    probe = copy.deepcopy(block)
    for module in probe.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 2:
                value = torch.randn(param.shape, generator=g) / param.shape[-1] ** 0.5
            else:
                value = torch.rand(param.shape, generator=g) + 0.5
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and (buffer.is_meta or buffer.is_floating_point()):
                module._buffers[name] = torch.zeros(buffer.shape) if buffer.is_meta else buffer.float().cpu()
    return probe.float().eval()
