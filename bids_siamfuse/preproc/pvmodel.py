"""Partial-volume intensity model of the brain (used by :mod:`.segmentation`).

Pure numpy/scipy: tissue fractions of each voxel from its intensity, under a model of pure
CSF, GM, WM and their CSF/GM and GM/WM mixtures (Santago & Gage 1993, as FSL FAST / CAT12).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError


def partial_volume(image, mu_csf, mu_gm, mu_wm, wm_side):
    """GM, WM, CSF fractions from intensity, unmixing between adjacent tissue means.

    ``wm_side``: True where the voxel is a GM/WM mixture (else CSF/GM), from the posteriors.
    Intensities beyond a pure-tissue mean count as that tissue.
    """
    gm = np.zeros_like(image, dtype=np.float32)
    wm = np.zeros_like(gm)
    csf = np.zeros_like(gm)
    span_low = np.maximum(mu_gm - mu_csf, 1e-6)
    span_high = np.maximum(mu_wm - mu_gm, 1e-6)
    f_low = np.clip((image - mu_csf) / span_low, 0.0, 1.0)  # GM share of a CSF/GM mix
    f_high = np.clip((mu_wm - image) / span_high, 0.0, 1.0)  # GM share of a GM/WM mix
    low = ~wm_side
    gm[low] = f_low[low]
    csf[low] = 1.0 - f_low[low]
    gm[wm_side] = f_high[wm_side]
    wm[wm_side] = 1.0 - f_high[wm_side]
    return gm, wm, csf


@dataclass
class PVModel:
    """Intensity model of the brain: pure CSF, GM, WM and their CSF/GM and GM/WM mixtures.

    A voxel of a pure class has intensity ``N(mu_k, sigma^2)``; a mixed voxel holds a share
    ``f ~ U(0, 1)`` of the brighter class, ``f mu_a + (1 - f) mu_b`` plus the same noise
    (Santago & Gage 1993; the partial-volume model of FSL FAST and CAT12). Fitted to the
    brain's intensity histogram by maximum likelihood.
    """

    means: np.ndarray  # CSF, GM, WM
    sigma: float
    weights: np.ndarray  # CSF, GM, WM, CSF/GM, GM/WM

    def densities(self, x: np.ndarray) -> np.ndarray:
        from scipy.stats import norm

        c, g, w = self.means
        s = self.sigma
        pure = [norm.pdf(x, m, s) for m in (c, g, w)]
        mix = [
            (norm.cdf((x - lo) / s) - norm.cdf((x - hi) / s)) / (hi - lo)
            for lo, hi in ((c, g), (g, w))
        ]
        return np.stack(pure + mix) * self.weights[:, None]


def _pv_negloglik(params, centres, counts):
    c, g, w, log_s = params[:4]
    weights = np.exp(params[4:] - params[4:].max())
    weights /= weights.sum()
    if not c < g < w:
        return 1e30
    model = PVModel(np.array([c, g, w]), float(np.exp(log_s)), weights)
    dens = model.densities(centres).sum(axis=0)
    return -float(np.sum(counts * np.log(dens + 1e-300)))


def fit_pv_model(values: np.ndarray, init_means, bins: int = 256) -> PVModel:
    """Maximum-likelihood fit of :class:`PVModel` to ``values`` (histogram, Nelder-Mead)."""
    from scipy.optimize import minimize

    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, [0.5, 99.9])
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    c, g, w = (float(v) for v in init_means)
    start = np.concatenate([[c, g, w, np.log(0.1 * (w - g))], np.zeros(5)])
    scale = w - c
    res = minimize(
        lambda p: _pv_negloglik(np.concatenate([p[:3] * scale, p[3:]]), centres, counts),
        np.concatenate([start[:3] / scale, start[3:]]),
        method="Nelder-Mead",
        options={"maxiter": 4000, "maxfev": 8000, "xatol": 1e-5, "fatol": 1e-3},
    )
    p = np.concatenate([res.x[:3] * scale, res.x[3:]])
    weights = np.exp(p[4:] - p[4:].max())
    model = PVModel(np.sort(p[:3]), float(np.exp(p[3])), weights / weights.sum())
    if not (lo <= model.means[0] < model.means[1] < model.means[2] <= hi):
        raise DataError(
            "segmentation failed: the tissue intensity model does not fit this T1w "
            f"(means {np.round(model.means, 1).tolist()})"
        )
    return model


def _truncated_mean(m, s):
    """Mean of N(m, s^2) truncated to [0, 1]."""
    from scipy.stats import norm

    a, b = (0.0 - m) / s, (1.0 - m) / s
    z = norm.cdf(b) - norm.cdf(a)
    out = m + s * (norm.pdf(a) - norm.pdf(b)) / np.maximum(z, 1e-12)
    return np.clip(np.where(z > 1e-12, out, np.clip(m, 0, 1)), 0.0, 1.0)


#: ``pair`` codes of :func:`pv_fractions`: which two tissues a boundary voxel can mix
CSF_GM, GM_WM, CSF_WM = 0, 1, 2


def pv_fractions(image: np.ndarray, model: PVModel, wm_side: np.ndarray):
    """Expected GM, WM, CSF fractions of each voxel under ``model`` (noise accounted for).

    ``wm_side``: which pair of tissues the voxel can mix, from the posteriors: False/0 CSF/GM,
    True/1 GM/WM, 2 CSF/WM (:data:`CSF_WM`: the walls of the ventricles, where no GM lies
    between CSF and WM; a half-CSF half-WM voxel has the intensity of GM, and a CSF/GM or
    GM/WM model counts it as GM: the thin GM rim that lined the ventricles on real scans).
    Computed on a 2048-level table of intensities spanning the model's range (CSF mean - 8
    sigma to WM mean + 8 sigma), then interpolated.
    """
    c, g, w = model.means
    s = model.sigma
    # the table spans the model's intensities (np.interp holds the end values beyond it), not
    # the image's range: one outlier (a vessel, an edge artefact) would otherwise squeeze the
    # whole brain into a few table levels
    lo, hi = c - 8.0 * s, w + 8.0 * s
    x = np.linspace(lo, hi, 2048)
    dens = model.densities(x)  # C, G, W, CG, GW
    tables = {}
    for side, classes in ((CSF_GM, (0, 1, 3)), (GM_WM, (1, 2, 4))):
        d = dens[list(classes)]
        r = d / np.maximum(d.sum(axis=0), 1e-300)
        if side == GM_WM:  # GM, WM, GM/WM: f = WM share
            f = _truncated_mean((x - g) / (w - g), s / (w - g))
            tables[side] = (r[0] + r[2] * (1 - f), r[1] + r[2] * f, np.zeros_like(x))
        else:  # CSF, GM, CSF/GM: f = GM share
            f = _truncated_mean((x - c) / (g - c), s / (g - c))
            tables[side] = (r[1] + r[2] * f, np.zeros_like(x), r[0] + r[2] * (1 - f))
    # CSF/WM: no GM; the WM share unmixed between the two pure means (noise-aware)
    f = _truncated_mean((x - c) / (w - c), s / (w - c))
    tables[CSF_WM] = (np.zeros_like(x), f, 1.0 - f)
    pair = np.asarray(wm_side).astype(np.int8)
    out = [np.zeros(image.shape, np.float32) for _ in range(3)]
    for side in (CSF_GM, GM_WM, CSF_WM):
        sel = pair == side
        if not sel.any():
            continue
        for arr, table in zip(out, tables[side]):
            arr[sel] = np.interp(image[sel], x, table)
    return tuple(out)
