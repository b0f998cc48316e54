"""GLSD (distance matching), GLSD (similarity matching) and plain DINO on the demo data, same budget.

    python benchmarks/dense_vs_dino.py --out benchmarks/results/dense_vs_dino_cpu.json

Each run is the embedded demo recipe (``configs/demo.yaml``: ViT with 4 blocks, patch 8, 32 px
Fashion-MNIST, 2 global 32 px + 4 local 16 px crops, 4 epochs, batch 64) with only ``method.name``
and ``method.dense_matching`` changed, so the three share data, crops, schedule, seed and steps.
The last-epoch online kNN (CLS token of the teacher, 10k train / 2k test images) is the score.
The demo data is written first if missing (``run_pretrain.py --demo`` does the same).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "dino": ["method.name=dino"],
    "glsd_distance": ["method.name=glsd", "method.dense_matching=distance"],
    "glsd_similarity": ["method.name=glsd", "method.dense_matching=similarity"],
}


def final_knn(log: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in log.read_text().splitlines() if '"knn/' in line]
    if not rows:
        raise SystemExit(f"{log} has no kNN row: did the run reach its last epoch?")
    return {k.removeprefix("knn/"): v for k, v in rows[-1].items() if k.startswith("knn/")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dense_vs_dino_cpu.json")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/dense_vs_dino")
    parser.add_argument("--data", type=Path, default=ROOT / "runs/demo_data")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), default=sorted(RUNS))
    args = parser.parse_args(argv)

    if not (args.data / "train").is_dir():
        from selfdistill.demo import prepare_demo_data

        prepare_demo_data(args.data)
    results: dict[str, dict] = {}
    if args.out.is_file():
        results = json.loads(args.out.read_text()).get("runs", {})
    for name in args.only:
        out = args.work / name
        cmd = [sys.executable, str(ROOT / "run_pretrain.py"), "--config", str(ROOT / "configs/demo.yaml"),
               *RUNS[name], f"data.path={args.data / 'train'}", f"knn.val_path={args.data / 'test'}",
               f"train.output_dir={out}", f"train.epochs={args.epochs}", f"knn.every_epochs={args.epochs}"]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=str(ROOT))
        results[name] = {"overrides": RUNS[name], "seconds": round(time.perf_counter() - start, 1),
                         "knn": final_knn(out / "log.jsonl")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python benchmarks/dense_vs_dino.py",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
            "date": time.strftime("%Y-%m-%d"), "recipe": "configs/demo.yaml", "epochs": args.epochs,
            "runs": results}, indent=2) + "\n")
    print("| run | " + " | ".join(f"top1 k={k}" for k in (10, 20, 100, 200)) + " | seconds |")
    for name, r in results.items():
        cells = " | ".join(f"{r['knn'].get(f'top1_k{k}', float('nan')):.2f}" for k in (10, 20, 100, 200))
        print(f"| {name} | {cells} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
