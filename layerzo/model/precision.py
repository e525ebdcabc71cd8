"""fp32 master weights for the tuned layers of a low-precision (bf16/fp16) model.

A ZO update lr·g·z is far below bf16 resolution (8 mantissa bits): written
into a bf16 weight it rounds away and the layer never moves. So the tuned
layers are converted to float32 and run in float32; casts at the layer
boundary keep the frozen rest of the model in its own dtype:

    hidden (bf16) ─► cast fp32 ─► tuned layer (fp32 weights) ─► cast bf16 ─► next layer

Only floating tensors crossing the boundary are cast (hidden states, rotary
cos/sin, float attention masks); integer/bool tensors pass untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def fp32_master(modules: Sequence[nn.Module], outer_dtype: torch.dtype) -> list:
    """Convert ``modules`` to float32 in place and cast at their boundary; returns hook handles.

    No-op (empty list) when the model already runs in float32 or float64.
    """
    if outer_dtype in (torch.float32, torch.float64):
        return []
    handles = []
    for module in modules:
        module.float()

        def pre(mod, args, kwargs):
            return _cast(args, torch.float32), _cast(kwargs, torch.float32)

        def post(mod, args, output):
            return _cast(output, outer_dtype)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    return handles


@contextmanager
def fp32_master_layers(modules: Sequence[nn.Module], outer_dtype: torch.dtype) -> Iterator[None]:
    """Context-managed :func:`fp32_master`; the modules stay float32 afterwards."""
    handles = fp32_master(modules, outer_dtype)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
