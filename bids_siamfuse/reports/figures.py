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
    anchors: list | None = None,
) -> bytes:
    """One row of ``n`` slices per ``(label, overlay)``, each row with its own colour bar.

    The overlays (e.g. relevance of MRI, PET, combined) share the slices; values of 0 are
    transparent; every row's colour scale runs from its own minimum to its own maximum, or,
    with ``anchors`` (one value per row), is a diverging scale centred on the row's anchor
    (e.g. the uniform relevance 1/116) and spanning 0 to at least twice the anchor, so that a
    near-uniform map shows near-neutral colours instead of a full-range stretch of noise.
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
    from matplotlib.colors import TwoSlopeNorm

    for r, ((label, _), ov) in enumerate(zip(rows, overlays)):
        shown = ov[np.isfinite(ov) & (ov != 0)]
        # each row spans its own range (region values are often close to each other)
        vmax = float(shown.max()) if shown.size else 1.0
        vmin = float(shown.min()) if shown.size else 0.0
        norm, row_cmap = None, cmap
        if anchors is not None and anchors[r] and anchors[r] > 0:
            centre = float(anchors[r])
            top = max(vmax, 2 * centre)
            norm = TwoSlopeNorm(vcenter=centre, vmin=0.0, vmax=top)
            row_cmap = "RdBu_r"
        image = None
        for c, index in enumerate(cuts):
            ax = grid[r, c]
            bslice = np.take(bg, index, axis=axis).T
            oslice = np.take(ov, index, axis=axis).T
            ax.imshow(bslice, cmap="gray", origin="lower", vmin=0, vmax=bg_hi)
            layer = np.ma.masked_where(~np.isfinite(oslice) | (oslice == 0), oslice)
            image = ax.imshow(
                layer,
                cmap=row_cmap,
                origin="lower",
                interpolation="nearest",
                **(
                    {"norm": norm}
                    if norm is not None
                    else {"vmin": vmin, "vmax": max(vmax, vmin + 1e-9)}
                ),
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


#: Line styles of the methods' mean ROC curves: colour, dash pattern, marker (every 10th point).
_METHOD_STYLES = [
    ("#d62728", "-", None),
    ("#1f77b4", "--", "o"),
    ("#2ca02c", "-.", "s"),
    ("#9467bd", ":", "^"),
    ("#ff7f0e", (0, (5, 1, 1, 1)), "v"),
    ("#8c564b", (0, (3, 1)), "D"),
    ("#e377c2", "--", "x"),
    ("#7f7f7f", "-.", "P"),
    ("#bcbd22", ":", "*"),
    ("#17becf", (0, (1, 1)), "h"),
]


def roc_figure(roc, method: str, *, title: str = "", baselines=()) -> bytes:
    """ROC per fold of ``method`` (left) and the mean curve of every method (right).

    ``roc``: a DataFrame with ``method, repeat, fold, fpr, tpr`` (one class: the positive one).
    The mean curve interpolates every fold's TPR on a common FPR axis. ``baselines``: the other
    methods whose mean curve is drawn beside the model's, each with its own colour, dash
    pattern and marker. The axes run from -0.02 to 1.02, so folds whose curve follows the
    frame (a perfect fold runs up the left edge and along the top) stay visible, each fold in
    its own colour and dash pattern, shifted by a small distinct offset (at most 0.015) so that
    coinciding curves (two perfect folds) do not hide each other.
    """
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.4, 4.8))
    grid = np.linspace(0, 1, 101)

    def mean_curve(frame):
        curves = []
        for _, fold in frame.groupby(["repeat", "fold"]):
            fold = fold.sort_values(["fpr", "tpr"])
            curves.append(np.interp(grid, fold["fpr"], fold["tpr"]))
        if not curves:
            return None
        curve = np.mean(curves, axis=0)
        curve[0] = 0.0
        return curve

    own = roc[roc["method"] == method]
    groups = list(own.groupby(["repeat", "fold"]))
    n = max(1, len(groups))
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    dashes = ["-", "--", "-.", ":"]
    # folds whose curves coincide (e.g. two perfect folds, both running up the left edge and
    # along the top) would hide each other: each fold is shifted by a small, distinct offset
    # (at most 0.015) so that every one stays visible, in its own colour and dash pattern
    step = 0.03 / n
    for k, ((rep, fold), frame) in enumerate(groups):
        frame = frame.sort_values(["fpr", "tpr"])
        shift = (k - (n - 1) / 2) * step
        ax.plot(
            frame["fpr"] + shift,
            frame["tpr"] - shift,
            lw=1.3,
            alpha=0.9,
            color=cmap(k % cmap.N),
            ls=dashes[(k // 10) % len(dashes)] if n > 10 else dashes[k % len(dashes)],
            clip_on=False,
            zorder=3,
            label=(f"fold {fold}" + (f" (repeat {rep})" if own["repeat"].nunique() > 1 else ""))
            if n <= 10
            else None,
        )
    mean = mean_curve(own)
    if mean is not None:
        ax.plot(grid, mean, lw=2.5, color="black", label="mean", zorder=4)
    for a in (ax, ax2):
        a.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        a.set_xlabel("false positive rate (1 - specificity)")
        a.set_xlim(-0.03, 1.03)
        a.set_ylim(-0.03, 1.03)
        a.set_aspect("equal")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title or f"ROC: {method} per fold", fontsize=10)
    ax.legend(fontsize=6, loc="lower right")
    for k, name in enumerate([method, *[b for b in baselines if b != method]]):
        curve = mean_curve(roc[roc["method"] == name])
        if curve is None:
            continue
        colour, dash, marker = _METHOD_STYLES[k % len(_METHOD_STYLES)]
        ax2.plot(
            grid,
            curve,
            lw=2.5 if name == method else 1.5,
            ls=dash,
            color=colour,
            marker=marker,
            markevery=(k, 10),
            markersize=4,
            clip_on=False,
            label=name,
        )
    ax2.set_title("mean ROC of every method", fontsize=10)
    ax2.legend(fontsize=6, loc="lower right")
    return _png(fig)


def calibration_figure(calibration, methods) -> bytes:
    """Reliability curves (``calibration.tsv``): mean predicted probability per bin against the
    observed share of the positive class, one styled line per method, the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfectly calibrated")
    for k, name in enumerate(methods):
        part = calibration[calibration["method"] == name].sort_values("mean_predicted")
        if part.empty:
            continue
        colour, dash, marker = _METHOD_STYLES[k % len(_METHOD_STYLES)]
        ax.plot(
            part["mean_predicted"],
            part["observed"],
            ls=dash,
            color=colour,
            marker=marker or "o",
            markersize=4,
            lw=2 if k == 0 else 1.3,
            label=name,
        )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed share of the positive class")
    ax.set_title("Reliability (test subjects of all folds)", fontsize=10)
    ax.legend(fontsize=6, loc="upper left")
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
