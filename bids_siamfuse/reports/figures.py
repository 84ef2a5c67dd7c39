"""Report figures drawn with matplotlib (Agg): brain-slice mosaics, ROC, histograms, curves.

Every function returns PNG bytes (the HTML builders inline them as ``data:`` URIs, so a report
is one self-contained file). Slices are shown in neurological convention (left on the left),
whatever the direction of the grid's axes.
"""

from __future__ import annotations

import io

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
    _pyplot().close(fig)
    return buf.getvalue()


def to_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data`` with its axes flipped so that index order follows +x, +y, +z (no reslicing)."""
    out = np.asarray(data)
    for axis in range(3):
        if affine[axis, axis] < 0:
            out = np.flip(out, axis=axis)
    return out


def _slices(mask: np.ndarray, n: int, axis: int = 2) -> list[int]:
    """``n`` evenly spaced slice indices through the extent of ``mask`` along ``axis``."""
    other = tuple(a for a in range(3) if a != axis)
    idx = np.nonzero(mask.any(axis=other))[0]
    if idx.size == 0:
        return list(np.linspace(0, mask.shape[axis] - 1, n + 2).astype(int)[1:-1])
    lo, hi = idx.min(), idx.max()
    return [int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]]


def region_rows(
    background: np.ndarray,
    rows: list[tuple[str, np.ndarray]],
    affine: np.ndarray,
    *,
    title: str = "",
    cmap: str = "hot",
    unit: str = "",
    n: int = 7,
    axis: int = 2,
) -> bytes:
    """One row of ``n`` slices per ``(label, overlay)``, each row with its own colour bar.

    The overlays (e.g. relevance of MRI, PET, combined) share the slices; values of 0 are
    transparent; every row's colour scale runs from its own minimum to its own maximum.
    """
    plt = _pyplot()
    bg = to_ras(background, affine).astype(np.float32)
    finite = bg[np.isfinite(bg) & (bg > 0)]
    bg_hi = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    overlays = [to_ras(o, affine).astype(np.float32) for _, o in rows]
    extent = bg > 0.1 * bg_hi
    for o in overlays:
        extent |= o != 0
    cuts = _slices(extent, n, axis)
    fig, grid = plt.subplots(
        len(rows),
        n + 1,
        figsize=(1.3 * n + 0.6, 1.55 * len(rows) + 0.4),
        squeeze=False,
        gridspec_kw={"width_ratios": [1] * n + [0.08]},
    )
    for r, ((label, _), ov) in enumerate(zip(rows, overlays)):
        shown = ov[np.isfinite(ov) & (ov != 0)]
        # each row spans its own range (region values are often close to each other)
        vmax = float(shown.max()) if shown.size else 1.0
        vmin = float(shown.min()) if shown.size else 0.0
        image = None
        for c, index in enumerate(cuts):
            ax = grid[r, c]
            bslice = np.take(bg, index, axis=axis).T
            oslice = np.take(ov, index, axis=axis).T
            ax.imshow(bslice, cmap="gray", origin="lower", vmin=0, vmax=bg_hi)
            layer = np.ma.masked_where(~np.isfinite(oslice) | (oslice == 0), oslice)
            image = ax.imshow(
                layer,
                cmap=cmap,
                origin="lower",
                vmin=vmin,
                vmax=max(vmax, vmin + 1e-9),
                interpolation="nearest",
            )
            ax.set_axis_off()
            if r == 0:
                orig = index if affine[axis, axis] > 0 else background.shape[axis] - 1 - index
                pos = affine[axis, axis] * orig + affine[axis, 3]
                ax.set_title(f"{'xyz'[axis]}={pos:.0f}", fontsize=7)
            if c == 0:
                ax.text(
                    -0.08,
                    0.5,
                    label,
                    transform=ax.transAxes,
                    rotation=90,
                    ha="right",
                    va="center",
                    fontsize=8,
                )
        cbar = fig.colorbar(image, cax=grid[r, n])
        cbar.ax.tick_params(labelsize=6)
        if unit and r == len(rows) - 1:
            cbar.set_label(unit, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(wspace=0.02, hspace=0.08)
    return _png(fig)


def roc_figure(roc, method: str, *, title: str = "", baselines=()) -> bytes:
    """ROC per fold (thin) and the mean over folds (thick) of ``method``.

    ``roc``: a DataFrame with ``method, repeat, fold, fpr, tpr`` (one class: the positive one).
    The mean curve interpolates every fold's TPR on a common FPR axis. ``baselines``: methods
    whose mean curve is drawn dashed beside the model's.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    grid = np.linspace(0, 1, 101)

    def mean_curve(frame):
        curves = []
        for _, fold in frame.groupby(["repeat", "fold"]):
            fold = fold.sort_values(["fpr", "tpr"])
            curves.append(np.interp(grid, fold["fpr"], fold["tpr"]))
        return np.mean(curves, axis=0) if curves else None

    own = roc[roc["method"] == method]
    for (rep, fold), frame in own.groupby(["repeat", "fold"]):
        frame = frame.sort_values(["fpr", "tpr"])
        ax.plot(
            frame["fpr"],
            frame["tpr"],
            lw=1,
            alpha=0.55,
            label=f"fold {fold}" + (f" (repeat {rep})" if own["repeat"].nunique() > 1 else ""),
        )
    mean = mean_curve(own)
    if mean is not None:
        mean[0] = 0.0
        ax.plot(grid, mean, lw=2.5, color="black", label=f"{method} mean")
    for name in baselines:
        curve = mean_curve(roc[roc["method"] == name])
        if curve is not None:
            ax.plot(grid, curve, lw=1.5, ls="--", label=f"{name} mean")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"ROC: {method}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def permutation_figure(null: np.ndarray, observed: float, p_value: float | None) -> bytes:
    """Histogram of the shuffled-label balanced accuracies, the observed one as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    null = np.asarray(null, dtype=float)
    ax.hist(null, bins=min(30, max(5, null.size // 2)), color="#8aa", edgecolor="white")
    ax.axvline(observed, color="crimson", lw=2, label=f"observed {observed:.3f}")
    ax.axvline(0.5, color="grey", ls=":", lw=1, label="chance (two classes)")
    ax.set_xlabel("mean balanced accuracy with shuffled labels")
    ax.set_ylabel("reruns")
    ptxt = f", p = {p_value:.3g}" if p_value is not None else ""
    ax.set_title(f"Permutation test: {null.size} reruns{ptxt}", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


def history_figure(history) -> bytes:
    """Loss per epoch: one panel per training stage, one colour per fold, val dashed."""
    plt = _pyplot()
    stages = list(dict.fromkeys(history["stage"]))
    fig, axes = plt.subplots(1, len(stages), figsize=(5.0 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        part = history[history["stage"] == stage]
        for i, ((rep, fold), frame) in enumerate(part.groupby(["repeat", "fold"])):
            colour = f"C{i % 10}"
            label = f"fold {fold}" + (f"/r{rep}" if part["repeat"].nunique() > 1 else "")
            ax.plot(frame["epoch"], frame["train_loss"], color=colour, lw=1.2, label=label)
            if frame["val_loss"].notna().any():
                ax.plot(frame["epoch"], frame["val_loss"], color=colour, lw=1, ls="--")
        ax.set_title(f"{stage} (solid: training, dashed: validation)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(fontsize=6, ncol=2)
    return _png(fig)


def bar_figure(names, values, *, title: str, xlabel: str, colours=None) -> bytes:
    """Horizontal bars, the first name on top."""
    plt = _pyplot()
    names, values = list(names), np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(5.2, 0.28 * len(names) + 0.9))
    ax.barh(np.arange(len(names))[::-1], values, color=colours or "#d0583c")
    ax.set_yticks(np.arange(len(names))[::-1], names, fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def probability_figure(classes, probs, predicted: str) -> bytes:
    """Bars of the class probabilities of one session."""
    colours = ["#d0583c" if c == predicted else "#7a9cc6" for c in classes]
    return bar_figure(
        classes, probs, title=f"predicted: {predicted}", xlabel="probability", colours=colours
    )


def motion_figure(table, *, fd_limit: float | None = None) -> bytes:
    """PET motion per frame: translations (mm), rotations (deg), framewise displacement (mm)."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(7.0, 5.0), sharex=True)
    x = table["frame"].to_numpy()
    for axis, colour in zip("xyz", ("C0", "C1", "C2")):
        axes[0].plot(x, table[f"trans_{axis}"], color=colour, marker="o", ms=3, label=axis)
        axes[1].plot(
            x, np.degrees(table[f"rot_{axis}"]), color=colour, marker="o", ms=3, label=axis
        )
    axes[2].plot(x, table["framewise_displacement"], color="k", marker="o", ms=3)
    if fd_limit is not None:
        axes[2].axhline(fd_limit, color="r", ls="--", lw=1)
    for ax, label in zip(axes, ("translation (mm)", "rotation (deg)", "FD (mm)")):
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, ncol=3)
    axes[2].set_xlabel("frame")
    return _png(fig)
