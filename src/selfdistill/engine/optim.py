"""The one optimizer factory of every task: pretraining methods, fine-tuning and the linear probe.

Each task says which tensors train in which groups; this module alone turns ``optim.name`` and its
settings into an optimizer, through timm's ``create_optimizer_v2``, so a name means the same
optimizer wherever it is written. Per-group scales travel in the group dicts and are read by the
task's schedule: ``lr_scale`` (timm's layer decay; timm's schedulers multiply the scheduled rate by
it) and ``weight_decay`` (0 for biases and norms), plus pretraining's ``apply_wd`` / ``fixed_lr`` /
``frozen_epochs`` for :class:`~selfdistill.schedules.GroupCosineScheduler`.

Names are timm's (``timm.optim.list_optimizers()``) with one exception: ``sgd`` is plain momentum
SGD (``torch.optim.SGD(momentum=m, nesterov=False)``, timm's ``momentum``), as DINO's
``main_dino.py`` and ``eval_linear.py`` build it; timm's own ``sgd`` is Nesterov.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["OPTIMIZER_ALIASES", "create_optimizer", "optimizer_names"]

OPTIMIZER_ALIASES = {"sgd": "momentum"}  # ours -> timm's: sgd is DINO's plain momentum SGD


def optimizer_names() -> list[str]:
    """Every name ``create_optimizer`` accepts."""
    from timm.optim import list_optimizers

    return sorted({*list_optimizers(), *OPTIMIZER_ALIASES})


def create_optimizer(params: Iterable[Any], name: str, *, lr: float = 0.0, weight_decay: float = 0.0,
                     momentum: float = 0.9, betas: Iterable[float] | None = None, eps: float | None = None,
                     fused: bool = False, device: torch.device | None = None,
                     kwargs: Mapping[str, Any] | None = None, key: str = "optim.name") -> torch.optim.Optimizer:
    """timm's optimizer ``name`` (``sgd``: plain momentum) over ``params`` (tensors or group dicts,
    kept as given: names, ``lr_scale``, flags). ``betas`` / ``eps`` reach optimizers that take
    them, ``fused`` PyTorch's fused kernels where the optimizer has them (on CPU and CUDA),
    ``kwargs`` the constructor as is. A name timm cannot build is one ``ValueError`` naming ``key``."""
    from timm.optim import create_optimizer_v2, get_optimizer_info

    opt = OPTIMIZER_ALIASES.get(name, name)
    try:
        info = get_optimizer_info(opt)
    except ValueError:
        raise ValueError(f"{key}: unknown optimizer {name!r} (timm.optim.list_optimizers(), or sgd)") from None
    accepts = inspect.signature(info.opt_class.__init__).parameters
    kw: dict[str, Any] = {}
    if betas is not None and info.has_betas and "betas" in accepts:
        kw["betas"] = tuple(betas)
    if eps is not None and info.has_eps and "eps" in accepts:
        kw["eps"] = eps
    if fused and "fused" in accepts and device is not None and device.type in ("cpu", "cuda"):
        kw["fused"] = True
    kw.update(kwargs or {})
    try:
        return create_optimizer_v2(params, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum, **kw)
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"{key}: timm cannot build {name!r} with {kw}: {e}") from None
