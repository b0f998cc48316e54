"""Reading and writing student parameters outside forward, under DDP and every ZeRO stage.

Under ZeRO-3 a parameter object is an empty placeholder until it is gathered; every code path
that touches student weights outside forward (the EMA teacher, exports) goes through here.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Sequence

import torch
from torch import nn


def unwrap(accelerator: Any, model: nn.Module) -> nn.Module:
    """``model`` without its DDP or DeepSpeed wrapper (Accelerate's ``unwrap_model``; ``accelerator``
    may be None).

    Accelerate's ``unwrap_model`` imports DeepSpeed whenever it is installed, only to recognise its
    engine: about 2 s a process (MLflow and pandas come with it) for runs that never use it. An
    engine exists only once DeepSpeed is imported, so until then a DDP wrapper is all there is."""
    from accelerate.utils import is_compiled_module

    if accelerator is None:
        return model
    if "deepspeed" in sys.modules or is_compiled_module(model):
        return accelerator.unwrap_model(model)
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def is_zero3_partitioned(params: Sequence[torch.Tensor]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor]) -> Iterator[Sequence[torch.Tensor]]:
    """Yield ``params`` with their full values available (read-only)."""
    if is_zero3_partitioned(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield params
    else:
        yield params


def chunks(params: Sequence[torch.Tensor], max_numel: int = 50_000_000) -> Iterator[list[torch.Tensor]]:
    """Split a parameter list into pieces of bounded size, so a ZeRO-3 gather has bounded peak memory."""
    piece: list[torch.Tensor] = []
    size = 0
    for p in params:
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if piece and size + n > max_numel:
            yield piece
            piece, size = [], 0
        piece.append(p)
        size += n
    if piece:
        yield piece


def full_parameters(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter of ``module`` with its full value, gathered chunk by chunk under ZeRO-3.

    Collective under ZeRO-3: every rank must consume the whole iterator.
    """
    for piece in chunks(list(module.parameters())):
        with gathered(piece):
            yield from piece


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every parameter's full fp32 value on the CPU: gathered chunk by
    chunk under ZeRO-3, DeepSpeed's fp32 master where the module holds a bf16/fp16 copy. Collective
    under DeepSpeed: every rank must call it."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    names = [n for n, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    start = 0
    for piece in chunks(params):
        masters = fp32_masters(piece)
        with gathered(piece):
            for name, p, m in zip(names[start:start + len(piece)], piece, masters):
                if name in state:
                    state[name] = (m if m is not None else p.detach()).float().cpu().clone()
        start += len(piece)
    return state


def fp32_masters(params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """DeepSpeed's full fp32 master copy of each trainable low-precision parameter (bf16/fp16
    training keeps only rounded copies in the module), else None. Collective under DeepSpeed."""
    if all(p.dtype == torch.float32 for p in params):
        return [None] * len(params)
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p) if p.requires_grad else None for p in params]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` over matching parameters, with one ``_foreach`` op.

    The teacher is a plain fp32 module; the student may be partitioned (ZeRO-3) or hold bf16/fp16
    copies (DeepSpeed mixed precision), in which case the EMA reads DeepSpeed's fp32 master weights.
    """
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise RuntimeError(f"teacher has {len(t_params)} parameters but the student {len(s_params)}")
    start = 0
    for piece in chunks(s_params):
        t_piece = t_params[start:start + len(piece)]
        start += len(piece)
        masters = fp32_masters(piece)
        with gathered(piece):
            src = [(m if m is not None else p.detach()).to(dtype=t.dtype, device=t.device)
                   for p, m, t in zip(piece, masters, t_piece)]
            # t + (1 - m) (s - t): one pass over each tensor instead of a multiply and an add.
            torch._foreach_lerp_(t_piece, src, 1.0 - momentum)
