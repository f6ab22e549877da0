"""The figures of ``refconv-analyze landscape`` from its JSON report (matplotlib: the ``analysis`` extra)."""

from __future__ import annotations

from pathlib import Path

from .kernel_plots import figure_class

SATURATE_QUANTILE = 0.9  # the shared contour levels end here; higher losses share the top colour


def _label(entry: dict) -> str:
    return f"{Path(entry['path']).parent.name}/{Path(entry['path']).name} ({entry['kind']})"


def shared_levels(surfaces: list[list[list[float]]], count: int = 25) -> list[float]:
    """One set of contour levels for every surface, evenly spaced in log(loss) from the lowest loss of all to the
    90th percentile of all: the basin keeps its contours when the corners of the grid reach hundreds."""
    import numpy as np

    values = np.concatenate([np.asarray(s, dtype=float).ravel() for s in surfaces])
    values = values[np.isfinite(values)]
    low = max(float(values.min()), 1e-6)
    high = max(float(np.quantile(values, SATURATE_QUANTILE)), low * 1.001)
    return np.geomspace(low, high, count).tolist()


def plot_surfaces(report: dict, path: Path) -> Path:
    """The 2-D surfaces side by side on one colour scale and one set of levels (the paper's Fig. 8)."""
    import numpy as np
    from matplotlib.colors import LogNorm

    entries = report["checkpoints"]
    coords = np.asarray(report["settings"]["coords"])
    levels = shared_levels([e["surface"] for e in entries])
    fig = figure_class()(figsize=(4.2 * len(entries) + 1.2, 4.2), dpi=100)
    axes = fig.subplots(1, len(entries), squeeze=False)[0]
    filled = None
    for ax, e in zip(axes, entries):
        z = np.asarray(e["surface"], dtype=float)
        filled = ax.contourf(coords, coords, z, levels=levels, cmap="viridis", extend="max",
                             norm=LogNorm(levels[0], levels[-1]))
        ax.contour(coords, coords, z, levels=levels, colors="white", linewidths=0.4)
        ax.plot(0, 0, "r+", markersize=8)
        ax.set_title(f"{_label(e)}\nloss at 0: {e['loss0']:.4f}", fontsize=8)
        ax.set_xlabel("d1 (filter-normalized)")
        ax.set_aspect("equal")
    axes[0].set_ylabel("d2 (filter-normalized)")
    fig.colorbar(filled, ax=list(axes), label="training loss", shrink=0.9, format="%.3g")
    fig.suptitle(f"one set of log-spaced levels for all; above the {int(SATURATE_QUANTILE * 100)}th percentile of "
                 "all losses: top colour", fontsize=8)
    fig.savefig(path)
    return path


def plot_curves(report: dict, path: Path) -> Path:
    """Left: the loss along d1 and d2 (the surfaces' axes). Right: mean +- std rise of the loss at each radius."""
    coords = report["settings"]["coords"]
    fig = figure_class()(figsize=(10.0, 4.2), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    for i, e in enumerate(report["checkpoints"]):
        colour = f"C{i}"
        ax1.plot(coords, e["curve_d1"], "-", color=colour, label=f"{_label(e)}: d1")
        ax1.plot(coords, e["curve_d2"], "--", color=colour, label=f"{_label(e)}: d2")
        r = e["radius"]
        ax2.errorbar(r["radii"], r["rise_mean"], yerr=r["rise_std"], fmt="o-", color=colour, capsize=3,
                     label=_label(e))
    ax1.set_xlabel("offset (filter-normalized)")
    ax1.set_ylabel("training loss")
    ax1.set_title("1-D curves along the surface's directions", fontsize=9)
    ax1.legend(fontsize=6)
    ax2.set_xlabel("radius r")
    ax2.set_ylabel("L(theta + r d) - L(theta)")
    ax2.set_title(f"loss rise, mean +- std over {report['settings']['directions']} directions", fontsize=9)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_hessian(report: dict, path: Path) -> Path:
    """The power iteration's estimate of the top Hessian eigenvalue after each Hessian-vector product."""
    fig = figure_class()(figsize=(6.0, 4.0), dpi=100)
    ax = fig.add_subplot()
    for i, e in enumerate(report["checkpoints"]):
        h = e["hessian"]
        ax.plot(range(1, len(h["history"]) + 1), h["history"], "o-", color=f"C{i}", markersize=3,
                label=f"{_label(e)}: {h['top_eigenvalue']:.4g}{'' if h['converged'] else ' (not converged)'}")
    ax.set_xlabel("Hessian-vector products")
    ax.set_ylabel(r"estimate $v^T H v$ (largest $|\lambda|$)")
    ax.set_title(f"power iteration on {report['settings']['hessian_images']} training images", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_all(report: dict, out: Path) -> list[Path]:
    files = [plot_surfaces(report, out / "landscape_surface.png"), plot_curves(report, out / "landscape_curves.png")]
    if all(e["hessian"] for e in report["checkpoints"]):
        files.append(plot_hessian(report, out / "landscape_hessian.png"))
    return files
