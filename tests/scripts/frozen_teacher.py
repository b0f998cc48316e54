"""Run under ``accelerate launch``: a frozen teacher wrapped by FrozenTeacher gives the outputs of
the plain network, and under ZeRO-3 each rank holds only its partition. Writes one JSON per rank."""

import copy
import json
import sys
from pathlib import Path

import torch

from selfdistill.engine.distributed import configure_deepspeed, make_accelerator
from selfdistill.models import Backbone
from selfdistill.models.frozen import FrozenTeacher


def main(out_dir: str) -> None:
    acc = make_accelerator("fp32", 1, False, [], None)
    configure_deepspeed(acc, 4, 3.0)
    torch.manual_seed(0)
    net = Backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    reference = copy.deepcopy(net).eval()
    teacher = FrozenTeacher(net, acc)
    torch.manual_seed(1 + acc.process_index)  # different inputs per rank: the gathers are collective anyway
    x = torch.randn(4, 3, 16, 16)
    got = teacher(x.to(acc.device)).pooled.float().cpu()
    want = reference(x).pooled
    result = {"rank": acc.process_index, "partitioned": teacher.partitioned,
              "numel_per_rank": teacher.parameters_per_rank(), "numel": sum(p.numel() for p in reference.parameters()),
              "max_abs_diff": (got - want).abs().max().item(), "requires_grad": any(
                  p.requires_grad for p in teacher.module().parameters()), "training": teacher.module().training}
    Path(out_dir, f"rank{acc.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
