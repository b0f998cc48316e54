"""The baseline of the training-throughput benchmark: the same DINO recipe built from ``lightly``
(``DINOLoss``, ``DINOProjectionHead``, multi-crop ``DINOTransform``, ``update_momentum`` and the
cosine momentum schedule), with the recipe's timm backbone, crops, batch, precision and threads.

    python benchmarks/lightly_dino.py --config configs/dino_vit_small16.yaml train.batch_size_per_device=8 \\
        --steps 3 --json out.json

Two training steps, both lightly's own:
  * ``docs``: the step of lightly's documented DINO example (examples/pytorch/dino.py): the teacher
    and the student called once per view;
  * ``batched``: the step of lightly's ImageNet benchmark (benchmarks/imagenet/vitb16/dino.py): one
    call on the concatenated global views and one on the local views.
Both clip gradients to ``optim.clip_grad`` (as the recipe, and Lightning's ``gradient_clip_val``),
use torch's ``AdamW`` with lightly's weight-decay groups, and follow the recipe's schedules.

lightly is not a dependency of selfdistill: ``make bench-env`` installs it (``--no-deps``, torch is
left alone) into ``.bench-env/``, which this script puts on ``sys.path``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_ENV = ROOT / ".bench-env"
if BENCH_ENV.is_dir():
    sys.path.insert(0, str(BENCH_ENV))


def lightly_available() -> bool:
    try:
        import lightly  # noqa: F401
    except ImportError:
        return False
    return True


def build(config, device):
    """Student and teacher (backbone + head), loss, optimizer and the lr scheduler, as lightly's code builds them."""
    import torch
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters

    from selfdistill.models import create_timm_model

    m, c, o = config.model, config.method, config.optim
    if getattr(c, "head_nlayers", 3) != 3:
        raise ValueError("lightly's DINOProjectionHead has 3 layers; the recipe asks for "
                         f"method.head_nlayers={c.head_nlayers}")
    student_backbone = create_timm_model(m.name, m.img_size, m.patch_size, m.drop_path_rate, **m.kwargs)
    teacher_backbone = create_timm_model(m.name, m.img_size, m.patch_size, 0.0, **m.kwargs)
    teacher_backbone.load_state_dict(student_backbone.state_dict())
    dim = student_backbone.num_features
    head_kw = dict(input_dim=dim, hidden_dim=c.head_hidden_dim, bottleneck_dim=c.head_bottleneck_dim,
                   output_dim=c.out_dim, batch_norm=c.use_bn_in_head)
    student_head = DINOProjectionHead(**head_kw, freeze_last_layer=int(c.freeze_last_layer_epochs),
                                      norm_last_layer=c.norm_last_layer)
    teacher_head = DINOProjectionHead(**head_kw)
    teacher_head.load_state_dict(student_head.state_dict())
    deactivate_requires_grad(teacher_backbone)
    deactivate_requires_grad(teacher_head)
    nets = [n.to(device) for n in (student_backbone, student_head, teacher_backbone, teacher_head)]
    criterion = DINOLoss(output_dim=c.out_dim, warmup_teacher_temp=c.warmup_teacher_temp, teacher_temp=c.teacher_temp,
                         warmup_teacher_temp_epochs=c.warmup_teacher_temp_epochs, student_temp=c.student_temp,
                         center_momentum=c.center_momentum).to(device)
    params, params_no_wd = get_weight_decay_parameters([student_backbone, student_head])
    lr = o.lr * config.train.batch_size_per_device / 256 if o.scale_lr_with_batch else o.lr
    optimizer = torch.optim.AdamW([{"name": "dino", "params": params, "weight_decay": o.weight_decay},
                                   {"name": "dino_no_weight_decay", "params": params_no_wd, "weight_decay": 0.0}],
                                  lr=lr, betas=o.betas)
    return nets, criterion, optimizer


def synthetic_views(config, seed: int = 0):
    """One batch: random images through lightly's DINOTransform, views stacked view by view."""
    import torch
    from lightly.transforms import DINOTransform

    from selfdistill.engine.throughput import random_images

    d = config.data
    transform = DINOTransform(global_crop_size=d.global_crop_size, global_crop_scale=tuple(d.global_crop_scale),
                              local_crop_size=d.local_crop_size, local_crop_scale=tuple(d.local_crop_scale),
                              n_local_views=d.n_local_crops, normalize={"mean": list(d.mean), "std": list(d.std)})
    torch.manual_seed(seed)
    per_image = [transform(img) for img in random_images(config.train.batch_size_per_device, seed=seed)]
    return [torch.stack([views[k] for views in per_image]) for k in range(len(per_image[0]))]


def real_loader(config):
    """``data.path`` (images, recursively) through lightly's DINOTransform and a torch DataLoader."""
    import torch
    from lightly.transforms import DINOTransform
    from PIL import Image

    d = config.data
    files = sorted(p for p in Path(d.path).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise FileNotFoundError(f"data.path: no images below {d.path!r}")
    transform = DINOTransform(global_crop_size=d.global_crop_size, global_crop_scale=tuple(d.global_crop_scale),
                              local_crop_size=d.local_crop_size, local_crop_scale=tuple(d.local_crop_scale),
                              n_local_views=d.n_local_crops, normalize={"mean": list(d.mean), "std": list(d.std)})

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            with Image.open(files[i]) as img:
                return transform(img.convert("RGB"))

    def collate(samples):
        return [torch.stack([s[k] for s in samples]) for k in range(len(samples[0]))]

    loader = torch.utils.data.DataLoader(Files(), batch_size=config.train.batch_size_per_device, shuffle=True,
                                         drop_last=True, num_workers=d.num_workers, collate_fn=collate,
                                         persistent_workers=d.num_workers > 0)
    while True:
        yield from loader


def run(config, steps: int, warmup: int, data: str, style: str, flops: bool = True) -> dict:
    import torch
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule

    from selfdistill.engine.throughput import (StepTimer, count_flops, gate_from_env, make_report,
                                               matmul_flops_per_s, peak_memory_gib)

    t = config.train
    device = torch.device("cuda" if torch.cuda.is_available() and not t.cpu else "cpu")
    torch.manual_seed(t.seed)
    (student_backbone, student_head, teacher_backbone, teacher_head), criterion, optimizer = build(config, device)
    total_steps = warmup + steps + 1
    warmup_steps = int(round(config.optim.warmup_epochs * total_steps / max(t.epochs, 1)))
    scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=warmup_steps, max_epochs=total_steps)
    amp = t.precision != "fp32"
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float16
    batches = real_loader(config) if data == "real" else None
    fixed = None if batches is not None else [v.to(device) for v in synthetic_views(config, t.seed)]
    params = list(student_backbone.parameters()) + list(student_head.parameters())
    n_global = 2
    epoch = 0

    def student(x):
        return student_head(student_backbone(x).flatten(start_dim=1))

    def teacher(x):
        return teacher_head(teacher_backbone(x).flatten(start_dim=1))

    def step(i: int, timer: StepTimer | None) -> torch.Tensor:
        mark = timer.mark if timer else (lambda phase: None)
        if timer:
            timer.start()
        views = fixed if fixed is not None else [v.to(device, non_blocking=True) for v in next(batches)]
        mark("data")
        momentum = cosine_schedule(i, total_steps, config.method.momentum_teacher, config.method.momentum_teacher_end)
        update_momentum(student_backbone, teacher_backbone, m=momentum)
        update_momentum(student_head, teacher_head, m=momentum)
        mark("ema")
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            if style == "docs":
                teacher_out = [teacher(v) for v in views[:n_global]]
                student_out = [student(v) for v in views]
            else:
                with torch.no_grad():
                    teacher_out = teacher(torch.cat(views[:n_global])).chunk(n_global)
                student_out = torch.cat([student(torch.cat(views[:n_global])),
                                         student(torch.cat(views[n_global:]))]).chunk(len(views))
            loss = criterion(teacher_out, student_out, epoch=epoch)
        mark("forward")
        loss.backward()
        mark("backward")
        student_head.cancel_last_layer_gradients(current_epoch=epoch)
        wd = cosine_schedule(i, total_steps, config.optim.weight_decay, config.optim.weight_decay_end)
        optimizer.param_groups[0]["weight_decay"] = wd
        if config.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, config.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        mark("optimizer")
        return loss

    for module in (student_backbone, student_head):
        module.train()
    teacher_backbone.eval()  # as the project's teacher: no drop path, and a ViT has no BatchNorm
    timer = StepTimer(device, skip=warmup, gate=gate_from_env())
    for i in range(warmup + steps):
        step(i, timer)
    timer.stop()
    peak = peak_memory_gib(device)
    flops_per_step = count_flops(lambda: step(warmup + steps, None))[1] if flops else 0
    n_params = sum(p.numel() for p in params)
    return make_report(impl=f"lightly-{style}", config=config, summary=timer.summary(), peak_gib=peak,
                       flops_per_step=flops_per_step, device=device, data=data, student_parameters=n_params,
                       matmul=matmul_flops_per_s(t.precision, device))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    p.add_argument("--style", choices=["docs", "batched"], default="docs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not lightly_available():
        print("lightly is not installed: run `make bench-env` (installs it into .bench-env/ without touching torch)",
              file=sys.stderr)
        return 3
    from selfdistill.recipe import load_config
    from selfdistill.engine.throughput import format_report

    config = load_config(args.config, args.overrides)
    if config.method.name != "dino":
        print(f"error: the lightly baseline is DINO only; the recipe is method.name={config.method.name}",
              file=sys.stderr)
        return 2
    report = run(config, args.steps, args.warmup, args.data, args.style)
    print(format_report(report))
    if args.json:
        out = Path(args.json)
        from selfdistill.atomic import write_json_atomic

        write_json_atomic(out, report, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
