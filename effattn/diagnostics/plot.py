"""Figures of a Report, as PNG files. matplotlib is optional: it is imported here, when a figure
is drawn (through its object API and the Agg canvas: no pyplot, no global backend change)."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

from . import stats
from .report import VANISHED_RATIO


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("Report.plot needs matplotlib (pip install matplotlib)") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def relative_log10(norms: Sequence[float]) -> List[float]:
    """log10(||g_t|| / reference) (reference: the last timestep's norm, stats.reference_norm);
    -inf where the gradient is exactly zero, nan where it is not finite."""
    ref = stats.reference_norm(norms)
    out = []
    for g in norms:
        if g is None or not math.isfinite(g) or ref <= 0:
            out.append(math.nan)
        else:
            out.append(math.log10(g / ref) if g > 0 else -math.inf)
    return out


def time_figure(panels: Dict[str, List[Optional[List[float]]]], path: str, decades: float = 30.0,
                title: Optional[str] = None) -> str:
    """Writes one timestep x step heatmap per panel (``{name: norms[step][t]}``), colour
    log10(||g_t|| / ||g_T||) on one scale for all panels, from -``decades`` (and black for exact
    zeros) up; under them, the last step's curves on one axes, where geometric decay is a
    straight line. Returns ``path``."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 1.6 * len(panels) + 3.2)
    grid = fig.add_gridspec(len(panels) + 1, 1, height_ratios=[1] * len(panels) + [1.8])
    rows = {}
    for name, norms in panels.items():
        T = max((len(n) for n in norms if n is not None), default=0)
        image = np.full((len(norms), T), np.nan)
        for step, n in enumerate(norms):
            if n is not None:
                image[step, :len(n)] = relative_log10(n)
        rows[name] = image
    top = max([1.0] + [float(np.nanmax(np.where(np.isinf(im), np.nan, im))) for im in rows.values()
                       if np.isfinite(im).any()])
    cmap = _colormap()
    shown = None
    for i, (name, image) in enumerate(rows.items()):
        ax = fig.add_subplot(grid[i])
        below = np.where(np.isneginf(image), -decades - 1.0, image)  # exact zeros: the "under" colour
        shown = ax.imshow(below, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-decades, vmax=top,
                          origin="lower", extent=(0.5, image.shape[1] + 0.5, 0.5, image.shape[0] + 0.5))
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_ylabel("step")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if i == len(rows) - 1:
            ax.set_xlabel("timestep t")
    if shown is not None:
        fig.colorbar(shown, ax=fig.axes, label="log10 ||dL/dh_t|| / ||dL/dh_T||", shrink=0.8, extend="min")
    ax = fig.add_subplot(grid[len(panels)])
    for name, norms in panels.items():
        last = [n for n in norms if n is not None]
        if last:
            ys = np.array(relative_log10(last[-1]))
            ax.plot(np.arange(1, len(ys) + 1), np.where(np.isfinite(ys), ys, np.nan), label=name, lw=1.2)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("log10 ||g_t|| / ||g_T||")
    ax.set_title("last step (straight line: geometric decay; a gap: exactly zero)", fontsize=9, loc="left")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def _colormap():
    from matplotlib import colormaps
    # under: exact zeros and anything more than `decades` below; bad: steps without a record
    return colormaps["viridis"].with_extremes(under="black", bad="lightgrey")


def layers_figure(report, path: str) -> str:
    """Writes per-layer bars at the last step: log10 of the gradient norm over the model
    output's, and the fractions of exactly-zero outputs, of dead units and of zero gradients."""
    import numpy as np

    names = list(report.layers)
    ratio = np.array([report.grad_ratio(n)[-1] if report.steps else np.nan for n in names], dtype=float)
    fig = _figure(11, 0.28 * len(names) + 1.8)
    left, right = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(names))
    with np.errstate(divide="ignore"):
        logs = np.log10(ratio)
    threshold = math.log10(VANISHED_RATIO)
    floor = min([threshold] + [float(v) for v in logs if np.isfinite(v)])
    # exactly zero (log -inf): a black bar past everything else and past the threshold
    left.barh(y, np.where(np.isfinite(logs), logs, floor - 1), color=np.where(np.isfinite(logs), "tab:blue", "black"))
    left.axvline(threshold, color="tab:red", lw=0.8, ls="--", label=f"{VANISHED_RATIO:g}: vanished")
    left.legend(fontsize=7, loc="lower left")
    left.set_yticks(y, names, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("log10 grad norm / output's (black: exactly zero)")
    for offset, key, label in ((-0.27, "zero_act", "zero outputs"), (0.0, "dead_act", "dead units"),
                               (0.27, "zero_grad", "zero gradients")):
        values = [getattr(report.layers[n], key)[-1] if report.steps else np.nan for n in names]
        right.barh(y + offset, values, height=0.27, label=label)
    right.set_xlim(0, 1)
    right.set_xlabel("fraction (last step)")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    fig.suptitle(f"per layer, step {report.steps}", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def report_figures(report, path: str) -> List[str]:
    """Report.plot: ``<stem>-time.png`` and ``<stem>-layers.png`` for the sections it has."""
    stem = path[:-4] if path.endswith(".png") else path
    if os.path.dirname(stem):
        os.makedirs(os.path.dirname(stem), exist_ok=True)
    written = []
    if report.sequences:
        written.append(time_figure({n: r.norms for n, r in report.sequences.items()}, f"{stem}-time.png"))
    if report.layers:
        written.append(layers_figure(report, f"{stem}-layers.png"))
    return written
