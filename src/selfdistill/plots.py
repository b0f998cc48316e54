"""Pictures of a run: the training curves people look at before reading numbers."""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.atomic import atomic_path


def save_png(fig, out_path: str | Path, dpi: int, **savefig) -> Path:
    """Lay out, write atomically (a reader never sees half a picture) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, **savefig)
    finally:
        plt.close(fig)
    return out_path


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(log_path: str | Path, out_path: str | Path) -> Path | None:
    """Loss (and online kNN top-1, teacher entropy when logged) against optimizer steps."""
    rows = read_log(log_path)
    train = [r for r in rows if "loss" in r]
    knn_keys = sorted({k for r in rows for k in r if k.startswith("knn/top1_k")}, key=lambda k: int(k[10:]))
    knn_key = "knn/top1_k20" if "knn/top1_k20" in knn_keys else (knn_keys[0] if knn_keys else "")
    knn = [r for r in rows if knn_key in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + bool(knn) + any("teacher_entropy" in r for r in train)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.5)
    ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    ax.grid(alpha=0.3)
    i = 1
    if any("teacher_entropy" in r for r in train):
        ax = axes[0][i]
        i += 1
        ax.plot([r["step"] for r in train], [r.get("teacher_entropy") for r in train], label="teacher entropy")
        ax.plot([r["step"] for r in train], [r.get("teacher_kl_to_center") for r in train], label="KL to center")
        ax.set(xlabel="optimizer step", ylabel="nats", title="collapse signals")
        ax.legend()
        ax.grid(alpha=0.3)
    if knn:
        ax = axes[0][i]
        ax.plot([r["step"] for r in knn], [r[knn_key] for r in knn], marker="o")
        ax.set(xlabel="optimizer step", ylabel="top-1 (%)", title=f"online kNN (k={knn_key[10:]})")
        ax.grid(alpha=0.3)
    return save_png(fig, out_path, dpi=110)


def plot_all_curves(log_path: str | Path, out_path: str | Path, columns: int = 4) -> Path | None:
    """Every number ``log.jsonl`` holds (losses, schedules, gradient norm, collapse signals, throughput,
    evaluations), one small panel each against the optimizer step: what ``loss_curve.png`` leaves out."""
    rows = [r for r in read_log(log_path) if "event" not in r]
    keys = sorted({k for r in rows for k, v in r.items()
                   if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(columns, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, marker="o" if len(points) < 20 else None,
                ms=3)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.supxlabel("optimizer step", fontsize=9)
    return save_png(fig, out_path, dpi=100)


def plot_knn_bars(rows: dict[str, dict[str, float]], out_path: str | Path, title: str = "",
                  ks: tuple[int, ...] = (20,)) -> Path:
    """One bar per representation (its kNN top-1 at each ``k``), best at the top: the demo's table
    as a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) * len(ks) + 1.6))
    height = 0.8 / len(ks)
    for j, k in enumerate(ks):
        values = [rows[n].get(f"top1_k{k}", 0.0) for n in names]
        ys = [i + (j - (len(ks) - 1) / 2) * height for i in range(len(names))]
        bars = ax.barh(ys, values, height=height * 0.95, label=f"k={k}")
        ax.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("kNN top-1 on the held-out split (%)")
    ax.set_xlim(0, max(100.0, max(v for r in rows.values() for v in r.values()) + 8))
    ax.set_title(title, fontsize=10)
    if len(ks) > 1:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, out_path, dpi=110, bbox_inches="tight")
