"""Frozen external teachers (SMD, FD): inference only, in the run's precision, and under
DeepSpeed ZeRO-3 partitioned over the ranks like the student, so a ViT-B teacher does not cost
every rank a full copy.

Under ZeRO-3 the teacher gets its own inference-only DeepSpeed engine (no optimizer): DeepSpeed
partitions its parameters at start-up and gathers each layer's weights just for its forward. Every
rank must therefore call it the same number of times (it is collective), as it does for the student.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def zero_stage(accelerator: Any) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def inference_deepspeed_config(train_config: dict[str, Any]) -> dict[str, Any]:
    """The training DeepSpeed config reduced to what an inference-only ZeRO-3 engine needs:
    the same precision, micro-batch and parameter offload, no optimizer or gradient settings."""
    zero = train_config.get("zero_optimization", {})
    keep = ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
            "stage3_max_reuse_distance", "offload_param")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train_config.get("train_micro_batch_size_per_gpu", 1),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, **{k: zero[k] for k in keep if k in zero}},
        "steps_per_print": 10**9,
    }
    for precision in ("bf16", "fp16"):
        enabled = train_config.get(precision, {}).get("enabled", False)
        config[precision] = {"enabled": enabled is True}
    return config


class FrozenTeacher(nn.Module):
    """Wraps a network that is never trained: eval mode, no gradients, on the run's device.

    Outside ZeRO-3 the network is a plain module (autocast gives it the run's precision). Under
    ZeRO-3 it is partitioned: ``parameters_per_rank`` shows each rank holds ~1/world of it.
    """

    def __init__(self, network: nn.Module, accelerator: Any) -> None:
        super().__init__()
        network.eval().requires_grad_(False)
        self.partitioned = zero_stage(accelerator) == 3 and accelerator.num_processes > 1
        if self.partitioned:
            import deepspeed

            config = inference_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config)
            engine, *_ = deepspeed.initialize(model=network, config=config)
            engine.eval()
            self.network = engine
        else:
            self.network = network.to(accelerator.device)

    def train(self, mode: bool = True) -> FrozenTeacher:  # always eval: BN / dropout stay frozen
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.network(*args, **kwargs)

    def module(self) -> nn.Module:
        return self.network.module if self.partitioned else self.network

    def parameters_per_rank(self) -> int:
        """Parameter elements this rank holds: its ZeRO-3 partitions (small parameters under
        ``stage3_param_persistence_threshold`` stay whole on every rank), or everything."""
        params = list(self.module().parameters())
        if self.partitioned:
            return sum(p.ds_numel if getattr(p, "ds_persist", False) else p.ds_tensor.numel() for p in params)
        return sum(p.numel() for p in params)
