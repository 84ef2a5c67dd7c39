"""A physically simulated T1w phantom with known tissue volumes (docs/preprocessing.md).

BrainWeb (the usual reference) downloads from its site at run time, which is neither allowed
nor reachable here, so the phantom is built the way BrainWeb was: a *sharp* tissue model at a
resolution finer than the scan, turned into T1w intensities and averaged over each scan voxel,
so that every voxel's tissue fractions are true partial volumes (what a voxel holds), not
probabilities.

The tissue model is not the ICBM152 probability maps used as fractions (what the synthetic
cohort of ``bids_siamfuse.synth`` does): the maps are only a starting point.

1. Subject space -> template: scaled by 1/``scale`` (a brain of ``scale`` x the template's
   linear size; 0.9 gives ~1.4 L instead of the template's ~1.9 L), rotated a few degrees and
   deformed by a smooth random displacement (Gaussian-filtered noise, ``warp_mm`` at most).
2. At 0.5 mm: the template's GM, WM, CSF probabilities and brain mask sampled there, each
   perturbed by smooth noise (1.5 mm Gaussian, SD ``roughness``) so boundaries fold at the
   millimetre scale, shifted by ``class_offsets`` (CSF +0.2, WM +0.1) and, inside the cortical
   ribbon, CSF raised by a 1 mm noise field (SD ``sulci``): the template is an average whose
   sulci are filled with GM; without these the tissue would be 58 % GM and 8 % CSF, with them
   ~49 % GM, 34 % WM, 17 % CSF of the intracranial volume (adult values: GM 40-50 %, CSF
   10-30 %). Every fine voxel then gets ONE label (brain mask >= 0.5, then the most probable
   class): sharp boundaries. Outside the brain: a dark skull (0-5 mm) and a bright
   scalp (5-10 mm) shell, air beyond.
3. Intensities per label (T1w MPRAGE-like ratios: CSF 0.25, GM 0.6, WM 1.0 x 1000; skull 0.08,
   scalp 0.9), averaged over the 2x2x2 (1 mm) or 2x2x6 (1x1x3 mm) fine voxels of a scan voxel:
   linear signal mixing, the partial-volume effect. The true fractions are the same averages
   of the labels.
4. A smooth multiplicative bias field (``bias`` peak-to-peak, ~20 % by default) and Rician
   noise: SD ``noise`` x WM at 1 mm^3, scaled by 1/sqrt(voxel volume) (a 3 mm^3 voxel averages
   3x the signal).

:func:`make_phantom` returns the image and its truth; :func:`score` compares a segmentation's
fractions with it (totals and regions). ``benchmarks/bench_phantom.py`` runs the pipeline on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

FINE_MM = 0.5
#: T1w intensities per label (0 air, 1 CSF, 2 GM, 3 WM, 4 skull, 5 scalp)
LABEL_INTENSITY = np.array([0.0, 250.0, 600.0, 1000.0, 80.0, 900.0], dtype=np.float32)
#: subject-space box (mm, RAS) holding a 0.9-scaled head
BOX_MIN = np.array([-80.0, -112.0, -72.0])
BOX_SIZE = np.array([160.0, 192.0, 162.0])  # divisible by 1 mm and 3 mm
#: coarse regions for the WM/CSF totals, in template (MNI) coordinates
COARSE_REGIONS = ("frontal", "central", "parietal", "occipital", "temporal", "infratentorial")


@dataclass
class Phantom:
    image: object  # nibabel T1w
    gm: np.ndarray  # true fractions on the image grid
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # true brain mask (brain fraction >= 0.5)
    aal: np.ndarray  # AAL label (0..116) at each voxel's template position
    coarse: np.ndarray  # 1..6 (COARSE_REGIONS, per hemisphere +6 for the right), 0 outside
    voxel: tuple
    params: dict = field(default_factory=dict)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.voxel)) / 1000.0


def _rotation(deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sample(img_data, img_affine, pts, order=1):
    inv = np.linalg.inv(img_affine)
    idx = np.einsum("ij,j...->i...", inv[:3, :3], pts) + inv[:3, 3].reshape(
        3, *[1] * (pts.ndim - 1)
    )
    return ndimage.map_coordinates(img_data, idx, order=order, mode="constant", cval=0.0)


def _smooth_noise(shape, sigma_vox, rng, sd=1.0) -> np.ndarray:
    out = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return out * np.float32(sd / max(float(out.std()), 1e-12))


def _coarse_labels(q: np.ndarray) -> np.ndarray:
    """Lobe-like boxes in template coordinates, 1..6 left, 7..12 right (see COARSE_REGIONS)."""
    x, y, z = q
    lab = np.full(x.shape, 1, dtype=np.uint8)  # frontal
    lab[(y < -20) & (z > 20)] = 3  # parietal
    lab[y < -70] = 4  # occipital
    lab[(z <= 0) & (y >= -70)] = 5  # temporal (and orbitofrontal base)
    lab[(np.abs(x) < 28) & (y > -45) & (y < 20) & (z > -10) & (z < 30)] = 2  # central/deep
    lab[(z < -25) & (y < -35)] = 6  # cerebellum, brainstem
    return lab + np.where(x > 0, 6, 0).astype(np.uint8)


def make_phantom(
    voxel=(1.0, 1.0, 1.0),
    *,
    seed: int = 0,
    scale: float = 0.9,
    rotation_deg=(4.0, -3.0, 5.0),
    warp_mm: float = 4.0,
    roughness: float = 0.15,
    sulci: float = 0.35,
    class_offsets=(0.2, 0.0, 0.1),
    bias: float = 0.2,
    noise: float = 0.025,
    fine_mm: float = FINE_MM,
) -> Phantom:
    """The phantom scanned at ``voxel`` mm (each a multiple of ``fine_mm`` dividing the box).

    ``fine_mm``: the tissue model's resolution (0.5 mm; coarser only for quick tests).
    """
    import nibabel as nb

    from .data.atlas import load_atlas
    from .data.templates import GRID_AFFINE, load_template

    rng = np.random.default_rng(seed)
    voxel = tuple(float(v) for v in voxel)
    factor = np.array([int(round(v / fine_mm)) for v in voxel])
    shape = np.round(BOX_SIZE / np.array(voxel)).astype(int)
    fine_shape = tuple(shape * factor)
    # 1. subject -> template map, evaluated on a 2 mm lattice and interpolated
    coarse_shape = tuple(np.ceil(BOX_SIZE / 2.0).astype(int) + 1)
    disp = np.stack([_smooth_noise(coarse_shape, 6.0, rng) for _ in range(3)])  # 12 mm
    disp *= np.float32(warp_mm / max(float(np.abs(disp).max()), 1e-6))
    lin = _rotation(rotation_deg) / scale
    templates = {k: load_template(k) for k in ("GM", "WM", "CSF", "mask")}
    maps = {k: np.asanyarray(v.dataobj, dtype=np.float32) for k, v in templates.items()}
    t_aff = templates["GM"].affine
    atlas = load_atlas()
    labels = np.zeros(fine_shape, dtype=np.uint8)
    aal = np.zeros(tuple(shape), dtype=np.uint8)
    coarse = np.zeros(tuple(shape), dtype=np.uint8)
    # slabs along z (memory): every slab a whole number of scan slices
    slab_vox = int(factor[2]) * max(1, 24 // int(factor[2]))
    noise_sd = roughness
    rough = [_smooth_noise(fine_shape, 1.5 / fine_mm, rng, noise_sd) for _ in range(3)]
    sulcal = _smooth_noise(fine_shape, 1.0 / fine_mm, rng, sulci)
    for z0 in range(0, fine_shape[2], slab_vox):
        z1 = min(fine_shape[2], z0 + slab_vox)
        idx = np.indices((fine_shape[0], fine_shape[1], z1 - z0), dtype=np.float32)
        idx[2] += z0
        p = BOX_MIN.reshape(3, 1, 1, 1) + (idx + 0.5) * fine_mm
        didx = (p - BOX_MIN.reshape(3, 1, 1, 1)) / 2.0
        u = np.stack([ndimage.map_coordinates(d, didx, order=1, mode="nearest") for d in disp])
        q = np.einsum("ij,j...->i...", lin, p).astype(np.float32) + u
        brain = _sample(maps["mask"], t_aff, q) >= 0.5
        probs = np.stack([_sample(maps[k], t_aff, q) for k in ("CSF", "GM", "WM")])
        probs += np.stack([r[..., z0:z1] for r in rough])
        probs += np.asarray(class_offsets, np.float32).reshape(3, 1, 1, 1)
        # sulci: thin CSF inside the cortical ribbon (where GM is likelier than WM)
        probs[0] += np.where(probs[1] > probs[2], sulcal[..., z0:z1], 0.0)
        lab = np.where(brain, np.argmax(probs, axis=0) + 1, 0).astype(np.uint8)
        labels[..., z0:z1] = lab
        # AAL and coarse region labels at the scan voxels' centres (every factor-th fine voxel)
        c = tuple(slice(int(f) // 2, None, int(f)) for f in factor)
        qc = q[(slice(None),) + c]
        sz = slice(z0 // factor[2], z1 // factor[2])
        aal[:, :, sz] = _sample(np.asarray(atlas.labels, np.float32), GRID_AFFINE, qc, order=0)
        coarse[:, :, sz] = _coarse_labels(qc)
        del idx, p, u, q, probs, didx
    del rough, sulcal
    # skull and scalp shells around the brain
    inside = labels > 0
    dist = ndimage.distance_transform_edt(~inside, sampling=fine_mm)
    labels[(~inside) & (dist <= 5.0)] = 4
    labels[(~inside) & (dist > 5.0) & (dist <= 10.0)] = 5
    del dist

    # 3. average over the scan voxels: intensities and fractions
    def block_mean(arr):
        a = arr.reshape(shape[0], factor[0], shape[1], factor[1], shape[2], factor[2])
        return a.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)

    signal = block_mean(LABEL_INTENSITY[labels])
    frac = {
        k: block_mean((labels == v).astype(np.float32))
        for k, v in (("CSF", 1), ("GM", 2), ("WM", 3))
    }
    brain_frac = frac["CSF"] + frac["GM"] + frac["WM"]
    del labels
    # 4. bias field and Rician noise
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = BOX_MIN + 0.5 * np.array(voxel)
    pts = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(tuple(shape), dtype=np.float32))
    pts += affine[:3, 3].reshape(3, 1, 1, 1)
    r = pts / 80.0
    a = rng.uniform(-1, 1, size=4)
    field_ = a[0] * r[0] + a[1] * r[1] + a[2] * r[2] + a[3] * (r[0] * r[1] + r[2] ** 2 - 0.3)
    field_ = np.exp(field_ * np.float32(bias / max(float(np.ptp(field_)), 1e-6)))
    sd = noise * LABEL_INTENSITY[3] / np.sqrt(np.prod(voxel))
    n1 = rng.standard_normal(signal.shape).astype(np.float32) * np.float32(sd)
    n2 = rng.standard_normal(signal.shape).astype(np.float32) * np.float32(sd)
    obs = np.sqrt((signal * field_ + n1) ** 2 + n2**2).astype(np.float32)
    img = nb.Nifti1Image(obs, affine)
    img.header.set_xyzt_units("mm")
    params = dict(
        seed=seed,
        scale=scale,
        rotation_deg=list(rotation_deg),
        warp_mm=warp_mm,
        roughness=roughness,
        bias=bias,
        noise=noise,
        voxel=list(voxel),
        fine_mm=fine_mm,
    )
    return Phantom(
        image=img,
        gm=frac["GM"],
        wm=frac["WM"],
        csf=frac["CSF"],
        brain=brain_frac >= 0.5,
        aal=aal,
        coarse=coarse,
        voxel=voxel,
        params=params,
    )


def score(ph: Phantom, gm: np.ndarray, wm: np.ndarray, csf: np.ndarray) -> dict:
    """Errors of estimated fractions (on the phantom's grid) against the truth.

    Totals in mL and % (true volumes: every voxel's fraction, the whole image); per AAL region
    the GM error in % (regions with >= 1 mL of true GM); per coarse region (lobe-like boxes,
    left/right) GM, WM and CSF errors in %.
    """
    v = ph.voxel_ml
    out: dict = {"voxel_mm": list(ph.voxel)}
    for name, est, true in (("GM", gm, ph.gm), ("WM", wm, ph.wm), ("CSF", csf, ph.csf)):
        t, e = float(true.sum()) * v, float(np.asarray(est, np.float64).sum()) * v
        out[name] = {"true_ml": t, "est_ml": e, "error_pct": 100.0 * (e - t) / t}
    tiv = sum(out[k]["true_ml"] for k in ("GM", "WM", "CSF"))
    out["true_fractions_of_tiv"] = {k: out[k]["true_ml"] / tiv for k in ("GM", "WM", "CSF")}
    n = 117
    t_reg = np.bincount(ph.aal.ravel(), ph.gm.ravel(), n)[1:] * v
    e_reg = np.bincount(ph.aal.ravel(), np.asarray(gm, np.float64).ravel(), n)[1:] * v
    keep = t_reg >= 1.0
    err = 100.0 * (e_reg[keep] - t_reg[keep]) / t_reg[keep]
    out["aal_gm"] = {
        "n_regions": int(keep.sum()),
        "median_abs_pct": float(np.median(np.abs(err))),
        "p90_abs_pct": float(np.percentile(np.abs(err), 90)),
        "max_abs_pct": float(np.abs(err).max()),
        "mean_pct": float(err.mean()),
    }
    coarse = {}
    names = [f"{s}_{r}" for s in ("L", "R") for r in COARSE_REGIONS]
    for tissue, est, true in (("GM", gm, ph.gm), ("WM", wm, ph.wm), ("CSF", csf, ph.csf)):
        t_c = np.bincount(ph.coarse.ravel(), true.ravel(), 13)[1:]
        e_c = np.bincount(ph.coarse.ravel(), np.asarray(est, np.float64).ravel(), 13)[1:]
        errs = 100.0 * (e_c - t_c) / np.maximum(t_c, 1e-9)
        coarse[tissue] = {
            nm: round(float(x), 2) for nm, x in zip(names, errs) if t_c[names.index(nm)] * v >= 1
        }
        out[f"coarse_{tissue}_max_abs_pct"] = float(np.abs(list(coarse[tissue].values())).max())
    out["coarse"] = coarse
    return out


#: what :func:`variant` makes of a phantom
VARIANTS = ("head", "skull-stripped", "conformed", "conformed-unpadded")


def variant(ph: Phantom, kind: str) -> Phantom:
    """The phantom stored another way, with its truth on the new grid.

    ``head``: as made. ``skull-stripped``: voxels outside the true brain mask dilated by one
    voxel set to 0 (as BET or SynthStrip output). ``conformed``: like FreeSurfer's
    ``mri_convert --conform`` output (``orig.mgz``/``T1.mgz`` as NIfTI): intensities scaled
    so the median of pure WM is 110, rounded to 0-255 integers (uint8), the 1 mm image put
    at the centre of a zero-filled 256^3 grid, stored LIA. Only for 1 mm phantoms.
    ``conformed-unpadded``: the same on the phantom's own grid (the input that failed the
    affine in issue 17: docs/preprocessing.md, "Other contrasts and inputs").
    """
    import nibabel as nb

    data = np.asanyarray(ph.image.dataobj, dtype=np.float32)
    params = {**ph.params, "variant": kind}
    if kind == "head":
        return ph
    if kind == "skull-stripped":
        keep = ndimage.binary_dilation(ph.brain, iterations=1)
        img = nb.Nifti1Image(np.where(keep, data, 0.0).astype(np.float32), ph.image.affine)
        img.header.set_xyzt_units("mm")
        return Phantom(img, ph.gm, ph.wm, ph.csf, ph.brain, ph.aal, ph.coarse, ph.voxel, params)
    if kind not in ("conformed", "conformed-unpadded"):
        raise ValueError(f"unknown phantom variant {kind!r} (one of {VARIANTS})")
    if not np.allclose(ph.voxel, 1.0):
        raise ValueError("the conformed variant needs a 1 mm phantom")
    wm = float(np.median(data[ph.wm > 0.99]))
    u8 = np.clip(np.round(data * 110.0 / wm), 0, 255).astype(np.uint8)
    shape = np.array(data.shape)
    size = 256 if kind == "conformed" else shape
    if (shape > size).any():
        raise ValueError(f"phantom of shape {tuple(shape)} does not fit a {size}^3 grid")
    lo = (np.asarray(size) - shape) // 2
    box = tuple(slice(int(a), int(a + n)) for a, n in zip(lo, shape))
    affine = ph.image.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ lo.astype(float)  # the same world positions

    def pad(a):
        out = np.zeros(tuple(np.broadcast_to(size, 3)), dtype=a.dtype)
        out[box] = a
        return out

    # RAS -> LIA: reorder and flip the arrays, and the affine with them
    ras, lia = nb.orientations.axcodes2ornt("RAS"), nb.orientations.axcodes2ornt("LIA")
    ornt = nb.orientations.ornt_transform(ras, lia)
    affine = affine @ nb.orientations.inv_ornt_aff(ornt, tuple(np.broadcast_to(size, 3)))

    def conform(a):
        return np.ascontiguousarray(nb.orientations.apply_orientation(pad(a), ornt))

    img = nb.Nifti1Image(conform(u8), affine)
    img.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    params["wm_to_110_from"] = wm
    return Phantom(
        image=img,
        gm=conform(ph.gm),
        wm=conform(ph.wm),
        csf=conform(ph.csf),
        brain=conform(ph.brain),
        aal=conform(ph.aal),
        coarse=conform(ph.coarse),
        voxel=ph.voxel,
        params=params,
    )


def save(ph: Phantom, prefix) -> None:
    """``<prefix>.nii.gz`` (the T1w) and ``<prefix>_truth.npz`` (fractions, labels, params)."""
    import json

    import nibabel as nb

    nb.save(ph.image, f"{prefix}.nii.gz")
    np.savez_compressed(
        f"{prefix}_truth.npz",
        gm=ph.gm,
        wm=ph.wm,
        csf=ph.csf,
        brain=ph.brain,
        aal=ph.aal,
        coarse=ph.coarse,
        params=json.dumps(ph.params),
    )


def load(prefix) -> Phantom:
    import json

    import nibabel as nb

    img = nb.load(f"{prefix}.nii.gz")
    t = np.load(f"{prefix}_truth.npz")
    params = json.loads(str(t["params"]))
    return Phantom(
        # as stored (a conformed variant stays uint8)
        image=nb.Nifti1Image(np.asanyarray(img.dataobj), img.affine),
        gm=t["gm"],
        wm=t["wm"],
        csf=t["csf"],
        brain=t["brain"],
        aal=t["aal"],
        coarse=t["coarse"],
        voxel=tuple(params["voxel"]),
        params=params,
    )
