"""SMD against SimSiam for a small student, on the demo data (CPU): does distilling a teacher's metric
beat self-supervised training of the same student for the same number of steps?

    python benchmarks/smd_vs_simsiam.py --data /path/to/demo_data --out benchmarks/results/smd_vs_simsiam_cpu.json
    # the BENCHMARKS.md result: a DINO ViT teacher, ResNet students
    python benchmarks/smd_vs_simsiam.py --arch resnet --teacher-method dino --teacher-epochs 12 \
        --work runs/smd_vs_simsiam_dino_resnet --out benchmarks/results/smd_vs_simsiam_dino_resnet_cpu.json

Three runs of ``run_pretrain.py`` on ``<data>/train`` (Fashion-MNIST, 32 px class folders, 10k images;
``run_pretrain.py --demo`` writes them) and one reference measurement:

1. ``teacher``: SimSiam trains the teacher (``--teacher-method dino``: DINO with the demo recipe,
   ``configs/demo.yaml``, for ``--teacher-epochs``);
2. ``smd_student``: SMD distils the teacher's export into the smaller student;
3. ``simsiam_student``: SimSiam trains the same student alone, same batch, same number of steps;
4. ``random_student``: the student at random initialisation (kNN only).

``--arch vit`` (default): the demo's ViT (4 blocks, width 192, patch 8) teaches a ViT of width 96
(4 blocks, 3 heads), AdamW with the demo's schedule. ``--arch resnet``: a ResNet-10-T of half width
(32-256 channels) is the student, SGD as in SimSiam / SMD; its SimSiam teacher is a ResNet-18, which
at this budget does not beat a randomly initialised ResNet on kNN. ``--teacher-method dino`` trains
the demo's ViT with DINO instead, for either student: the teacher SMD needs (see BENCHMARKS.md).
Every run shares the SimSiam / MoCo-v2 two-view augmentation (32 px crops, scale 0.2-1, blur radius
scaled to 32 px), the optimizer settings of its ``--arch`` and the seed. The score is the project's
weighted kNN (bank: the 10k training images, queries: the 2k test images, T = 0.07) of each evaluated
backbone after its last epoch (online kNN, ``knn.every_epochs`` = epochs). CPU seconds (user +
system, data-loader workers included) are recorded per run; each run uses one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Per family: teacher and student (timm name, kwargs), shared model keys, optimizer.
ARCHS = {
    "vit": {
        "teacher": ("vit_tiny_patch16_224", "{depth: 4}"),
        "student": ("vit_tiny_patch16_224", "{depth: 4, embed_dim: 96, num_heads: 3}"),
        "model": ["model.img_size=32", "model.patch_size=8"],
        "teacher_kwargs": "{img_size: 32, patch_size: 8, depth: 4}",
        "optim": ["optim.name=adamw", "optim.lr=1e-3", "optim.warmup_epochs=1", "optim.min_lr=1e-5",
                  "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.clip_grad=3.0"],
    },
    "resnet": {
        "teacher": ("resnet18", "{}"),
        "student": ("resnet10t", "{channels: [32, 64, 128, 256], stem_width: 16}"),
        "model": ["model.img_size=null"],
        "teacher_kwargs": "{}",
        "optim": ["optim.name=sgd", "optim.lr=0.05", "optim.min_lr=0.0", "optim.warmup_epochs=0",
                  "optim.weight_decay=1e-4", "optim.weight_decay_end=1e-4", "optim.clip_grad=0.0"],
    },
}


def common(args: argparse.Namespace, out: Path, epochs: int) -> list[str]:
    return [
        f"data.path={args.data / 'train'}", "data.global_crop_size=32", "data.global_crop_scale=[0.2, 1.0]",
        "data.blur_radius=[0.1, 0.5]", "data.n_local_crops=0", f"data.num_workers={args.workers}",
        "model.drop_path_rate=0.0", *ARCHS[args.arch]["model"], *ARCHS[args.arch]["optim"],
        f"train.output_dir={out}", f"train.epochs={epochs}", f"train.batch_size_per_device={args.batch}",
        "train.log_every=10", "train.checkpoint_every=100000", "train.trackers=[]", "train.progress_bar=false",
        f"knn.val_path={args.data / 'test'}", f"knn.every_epochs={epochs}", "knn.image_size=32",
        "knn.batch_size=256", "knn.k=[10, 20, 100, 200]",
    ]


def simsiam(args: argparse.Namespace) -> list[str]:
    return ["method.name=simsiam", f"method.proj_dim={args.proj_dim}", f"method.pred_dim={args.proj_dim // 4}"]


def dino_teacher(args: argparse.Namespace, out: Path) -> list[str]:
    """DINO with the demo recipe (its ViT is ``ARCHS["vit"]["teacher"]``), kNN every 4 epochs."""
    return ["--config", str(ROOT / "configs/demo.yaml"), f"data.path={args.data / 'train'}",
            f"knn.val_path={args.data / 'test'}", f"train.epochs={args.teacher_epochs}", f"train.output_dir={out}",
            f"knn.every_epochs={min(4, args.teacher_epochs)}", "train.trackers=[]", "train.progress_bar=false",
            "train.checkpoint_every=100000"]


def model(spec: tuple[str, str]) -> list[str]:
    return [f"model.name={spec[0]}", f"model.kwargs={spec[1]}"]


def final_knn(log: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in log.read_text().splitlines() if '"knn/' in line]
    if not rows:
        raise SystemExit(f"{log} has no kNN row: did the run reach its last epoch?")
    return {k.removeprefix("knn/"): v for k, v in rows[-1].items() if k.startswith("knn/")}


def last_steps(log: Path) -> int:
    return max(json.loads(line).get("step", 0) for line in log.read_text().splitlines())


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train(name: str, overrides: list[str], out: Path, threads: int) -> dict:
    cmd = [sys.executable, str(ROOT / "run_pretrain.py"), *overrides]
    print(f"== {name}: OMP_NUM_THREADS={threads} {' '.join(cmd[1:])}", flush=True)
    start, cpu0 = time.perf_counter(), cpu_children()
    subprocess.run(cmd, check=True, cwd=str(ROOT), env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return {"overrides": overrides, "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(cpu_children() - cpu0, 1), "steps": last_steps(out / "log.jsonl"),
            "knn": final_knn(out / "log.jsonl")}


def feature_spread(backbone, test_dir: Path, n: int = 512) -> dict[str, float]:
    """Mean pairwise cosine and distance of the L2-normalised embeddings of ``n`` fixed test images:
    a mean cosine near 1 means every image maps to about one direction (a collapsed student)."""
    import torch
    import torch.nn.functional as F

    from selfdistill.data import EvalTransform, ImageFolderDataset

    ds = ImageFolderDataset(test_dir, transform=EvalTransform(32))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    x = torch.stack([ds[i]["image"] for i in idx])
    backbone.eval()
    with torch.no_grad():
        f = F.normalize(backbone(x).pooled.float(), dim=1)
    cos = (f @ f.t())[~torch.eye(len(f), dtype=torch.bool)]
    return {"mean_cos": round(cos.mean().item(), 4), "mean_dist": round((2 - 2 * cos).clamp_min(0).sqrt().mean().item(), 4)}


def spread_of_run(out: Path, test_dir: Path) -> dict[str, float]:
    from selfdistill.models import load_backbone

    backbone, _ = load_backbone(str(out / "export" / "teacher_backbone.safetensors"))
    return feature_spread(backbone, test_dir)


def random_backbone(args: argparse.Namespace, spec: tuple[str, str]):
    """The student's architecture at the initialisation its runs start from (seeded as the loop seeds)."""
    import torch

    from selfdistill.recipe import load_config
    from selfdistill.models import Backbone

    cfg = load_config(None, [*common(args, args.work / "random", 1), *model(spec)])
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    return cfg, Backbone(m.name, m.img_size, m.patch_size, 0.0, False, **m.kwargs)


def random_init_knn(args: argparse.Namespace, spec: tuple[str, str]) -> dict:
    """The student's architecture at random initialisation, through the same kNN as the runs."""
    import torch

    from selfdistill.eval.knn_eval import KnnSetup

    cfg, backbone = random_backbone(args, spec)
    start, cpu0 = time.perf_counter(), cpu_self()
    knn = KnnSetup.from_config(cfg).evaluate(backbone, torch.device("cpu"))
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu_self() - cpu0, 1), "knn": knn,
            "feature_spread": feature_spread(backbone, args.data / "test")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "runs/demo_data", help="holds train/ and test/")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/smd_vs_simsiam_cpu.json")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/smd_vs_simsiam")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vit")
    parser.add_argument("--teacher-method", choices=["simsiam", "dino"], default="simsiam",
                        help="how the teacher is trained: SimSiam with the students' settings and --arch's "
                             "teacher network, or DINO with the demo recipe (configs/demo.yaml, the demo's ViT)")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--align-epochs", type=int, default=1, help="SMD's cosine alignment warm-up (epochs)")
    parser.add_argument("--tau", type=float, default=0.04)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--proj-dim", type=int, default=512, help="SimSiam projector width (predictor: 1/4)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run: on a shared 2-core machine two spinning OpenMP threads cost "
                             "about 6x the CPU time of one for these small models (measured)")
    parser.add_argument("--only", nargs="*", default=["teacher", "smd_student", "simsiam_student", "random_student"],
                        help="runs to (re)do; with no names, only fill in missing feature_spread diagnostics")
    args = parser.parse_args(argv)
    if not (args.data / "train").is_dir():
        raise SystemExit(f"{args.data}/train does not exist: write the demo data with `run_pretrain.py --demo` "
                         "or pass --data")

    results: dict[str, dict] = json.loads(args.out.read_text()).get("runs", {}) if args.out.is_file() else {}
    arch = ARCHS[args.arch]
    teacher, student = arch["teacher"], arch["student"]
    teacher_dir = args.work / "teacher"
    teacher_export = teacher_dir / "export" / "teacher_backbone.safetensors"
    if args.teacher_method == "dino":  # the demo's ViT, whatever the student
        teacher, teacher_kwargs = ARCHS["vit"]["teacher"], ARCHS["vit"]["teacher_kwargs"]
    else:
        teacher_kwargs = arch["teacher_kwargs"]
    plans = {
        "teacher": lambda out: (dino_teacher(args, out) if args.teacher_method == "dino" else
                                [*common(args, out, args.teacher_epochs), *simsiam(args), *model(teacher)]),
        "smd_student": lambda out: [
            *common(args, out, args.student_epochs), *model(student), "method.name=smd",
            f"method.teacher_model={teacher[0]}", f"method.teacher_kwargs={teacher_kwargs}",
            f"method.teacher_weights={teacher_export}", "method.teacher_format=selfdistill",
            f"method.tau={args.tau}", f"method.align_epochs={args.align_epochs}"],
        "simsiam_student": lambda out: [*common(args, out, args.student_epochs), *simsiam(args), *model(student)],
    }
    header = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.only or not header:
        header = {
            "command": "python benchmarks/smd_vs_simsiam.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU (shared)",
            "date": time.strftime("%Y-%m-%d"), "teacher": {"model": teacher[0], "kwargs": teacher[1]},
            "student": {"model": student[0], "kwargs": student[1]},
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from selfdistill.atomic import write_json_atomic

        write_json_atomic(args.out, {**header, "runs": results}, indent=2)

    for name in args.only:
        if name == "random_student":
            print("== random_student: kNN of the student at random initialisation", flush=True)
            results[name] = random_init_knn(args, student)
        else:
            out = args.work / name
            results[name] = train(name, plans[name](out), out, args.threads)
            results[name]["feature_spread"] = spread_of_run(out, args.data / "test")
        write()
    for name, r in results.items():  # diagnostics for runs written before they existed
        if "feature_spread" in r:
            continue
        if name == "random_student":
            r["feature_spread"] = feature_spread(random_backbone(args, student)[1], args.data / "test")
        elif (args.work / name / "export").is_dir():
            r["feature_spread"] = spread_of_run(args.work / name, args.data / "test")
    write()

    print("| run | " + " | ".join(f"top1 k={k}" for k in (10, 20, 100, 200)) + " | steps | CPU s | mean cos |")
    for name, r in results.items():
        cells = " | ".join(f"{r['knn'].get(f'top1_k{k}', float('nan')):.2f}" for k in (10, 20, 100, 200))
        spread = r.get("feature_spread", {}).get("mean_cos", float("nan"))
        print(f"| {name} | {cells} | {r.get('steps', '-')} | {r['cpu_s']} | {spread:.3f} |")
    total = sum(r["cpu_s"] for r in results.values())
    print(f"total CPU seconds: {total:.0f}")
    if "smd_student" in results and "simsiam_student" in results:
        smd, ss = results["smd_student"]["knn"]["top1_k20"], results["simsiam_student"]["knn"]["top1_k20"]
        print(f"SMD student vs SimSiam student, kNN top-1 k=20: {smd:.2f} vs {ss:.2f} ({smd - ss:+.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
