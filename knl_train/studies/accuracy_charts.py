"""A convergence study's two charts: final top-1 against global batch (the papers' plot), and the
validation curves per point.

Each returns False, and draws nothing, when it would be empty (no usable run; no evaluated
epoch), so a study where everything diverged still gets its table. matplotlib is imported only
to draw: it is optional and slow to load (ImportError when it is missing).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from knl_train.atomic import save_figure_atomic
from knl_train.studies.accuracy import HOLD, groups, number


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def chart(results: dict, rows: List[dict], path: Path) -> bool:
    """Final top-1 of the best LR against global batch (log2), one line per optimizer, and the
    base batch's accuracy as a reference with the band one point below it."""
    have = [r for r in rows if r["top1"] is not None]
    if not have:
        return False
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator
    ticks = sorted({r["global_batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    try:
        smallest = min(r["global_batch"] for r in have)
        base = 100 * max(r["top1"] for r in have if r["global_batch"] == smallest)
        ax.axhline(base, color="gray", linestyle="--",
                   label=f"base: {base:.1f} % at batch {smallest}")
        ax.axhspan(base - 100 * HOLD, base, color="gray", alpha=0.15, label="within 1 point")
        for opt in dict.fromkeys(r["optimizer"] for r in have):
            mine = [r for r in have if r["optimizer"] == opt]
            y = [100 * r["top1"] for r in mine]
            err = [[v - 100 * r["top1_min"] for v, r in zip(y, mine)],
                   [100 * r["top1_max"] - v for v, r in zip(y, mine)]]
            ax.errorbar([r["global_batch"] for r in mine], y, yerr=err, fmt="o-", capsize=3,
                        label=f"{opt} (best LR)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ticks))   # the batches run, not powers of two
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(b) for b in ticks])
        ax.set(xlim=(ticks[0] / 1.3, ticks[-1] * 1.3), xlabel="global batch",
               ylabel="final validation top-1 (%)")
        ax.set_title(f"{results['study']}: accuracy against global batch", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
    return True


def _curve_panel(ax, results: dict, opt: str, by_batch: dict, colour: dict) -> None:
    """One optimizer's curves: colour by batch, line style by LR, the target as a line."""
    styles = ("-", "--", ":", "-.")
    for batch, by_lr in by_batch.items():
        for i, (lr, runs) in enumerate(by_lr.items()):   # LRs ascending (groups)
            for n, run in enumerate(r for r in runs if r["curve"]):
                ax.plot([c[0] for c in run["curve"]], [100 * c[1] for c in run["curve"]],
                        styles[i % len(styles)], color=colour[batch], marker=".",
                        label=None if n else f"batch {batch}, LR {number(lr)}"
                        + ("" if run["status"] == "ok" else f" ({run['status']})"))
    if results.get("target_top1") is not None:
        ax.axhline(100 * results["target_top1"], color="tab:red", linestyle=":", label="target")
    ax.set_title(f"{results['study']}: {opt}", fontsize=10)
    ax.set(xlabel="epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def curves_chart(results: dict, path: Path) -> bool:
    """Validation top-1 against epoch per point: a panel per optimizer that has a curve (the
    others are named under the panels), colour by batch, whole epochs on the axis."""
    by_opt: dict = {}
    for (opt, batch), by_lr in groups(results).items():
        by_opt.setdefault(opt, {})[batch] = by_lr
    drawn = [o for o, bs in by_opt.items()
             if any(r["curve"] for by_lr in bs.values() for runs in by_lr.values() for r in runs)]
    if not drawn:
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    batches = sorted({b for bs in by_opt.values() for b in bs})
    cmap = plt.get_cmap("viridis")   # stops short of its yellow end, pale on white
    colour = {b: cmap(0.85 * i / max(1, len(batches) - 1)) for i, b in enumerate(batches)}
    epochs = [c[0] for p in results["points"] for c in p["curve"]]
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.5 * len(drawn), 4.2), squeeze=False,
                             sharey=True)
    try:
        for ax, opt in zip(axes[0], drawn):
            _curve_panel(ax, results, opt, by_opt[opt], colour)
            # Integer ticks even for one epoch (MaxNLocator wants two integers in view unless
            # told otherwise), and the same half-epoch margin on both sides.
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        axes[0][0].set_ylabel("validation top-1 (%)")
        without = [o for o in by_opt if o not in drawn]
        if without:
            fig.text(0.01, 0.01, f"no curves (no epoch evaluated): {', '.join(without)}",
                     fontsize=8)
        fig.tight_layout(rect=(0, 0.05 if without else 0, 1, 1))
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
    return True
