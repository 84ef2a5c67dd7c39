"""Reportlets: the participant workflow's QC figures (SVG), drawn with niworkflows' helpers.

Each function writes one SVG in the NiPreps style (three rows of seven slices: axial, coronal,
sagittal); the report assembles them from ``OUT/sub-<label>/figures/``. Registration figures are
"flickers": two layers (fixed image, moved image) that the HTML report alternates on hover, so
misalignment shows as movement. Everything runs offline (nilearn, matplotlib, svgutils).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _nii(img):
    import nibabel as nb

    return nb.load(str(img)) if isinstance(img, (str, Path)) else img


def _float(img):
    import nibabel as nb

    img = _nii(img)
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    return nb.Nifti1Image(data, img.affine)


def _as_file(img, path: Path) -> str:
    """niworkflows' plot_segs reads files: write ``img`` (float32) beside the figure."""
    _float(img).to_filename(str(path))
    return str(path)


def segmentation_svg(anat, segs, out_file, *, bbox=None, colors=None, levels=None) -> str:
    """Contours of ``segs`` (binary or probability maps, or a label map with ``levels``)."""
    from niworkflows.viz.utils import compose_view, plot_segs

    stem = Path(out_file).with_suffix("")
    compose_view(
        plot_segs(
            image_nii=_as_file(anat, Path(f"{stem}_anat.nii.gz")),
            seg_niis=[_as_file(s, Path(f"{stem}_seg{i}.nii.gz")) for i, s in enumerate(segs)],
            bbox_nii=_as_file(bbox, Path(f"{stem}_bbox.nii.gz")) if bbox is not None else None,
            out_file="unused.svg",
            masked=False,
            colors=colors,
            levels=levels,
            compress=False,
        ),
        fg_svgs=None,
        out_file=str(out_file),
    )
    return str(out_file)


def registration_svg(
    fixed, moved, out_file, *, fixed_label, moved_label, bbox=None, contour=None
) -> str:
    """Flicker figure: ``fixed`` and ``moved`` (already on the same grid) on the same cuts."""
    from niworkflows.viz.utils import compose_view, cuts_from_bbox, plot_registration

    fixed, moved = _float(fixed), _float(moved)
    cuts = cuts_from_bbox(_float(bbox) if bbox is not None else fixed, cuts=7)
    contour = _float(contour) if contour is not None else None
    compose_view(
        plot_registration(
            fixed,
            "fixed-image",
            estimate_brightness=True,
            cuts=cuts,
            label=fixed_label,
            contour=contour,
            compress=False,
        ),
        plot_registration(
            moved,
            "moving-image",
            estimate_brightness=True,
            cuts=cuts,
            label=moved_label,
            contour=contour,
            compress=False,
        ),
        out_file=str(out_file),
    )
    return str(out_file)


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Voxels of a label map that touch another label (in-plane, all three planes)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        for shift in (1, -1):
            edge |= labels != np.roll(labels, shift, axis=axis)
    return edge & (labels > 0)


def overlay_svg(anat, overlay, out_file, *, bbox=None, cmap="autumn", label=None) -> str:
    """A raster overlay (e.g. region boundaries) over ``anat``, three rows of seven cuts."""
    from uuid import uuid4

    import nibabel as nb
    from nilearn.plotting import plot_anat
    from niworkflows.viz.utils import compose_view, cuts_from_bbox, extract_svg
    from svgutils.transform import fromstring

    anat = _float(anat)
    overlay = _float(overlay)
    data = overlay.get_fdata()
    masked = nb.Nifti1Image((data > 0).astype(np.float32), overlay.affine)
    cuts = cuts_from_bbox(_float(bbox) if bbox is not None else anat, cuts=7)
    svgs = []
    for i, mode in enumerate(("z", "x", "y")):
        display = plot_anat(
            anat,
            display_mode=mode,
            cut_coords=cuts[mode],
            colorbar=False,
            title=label if i == 0 else None,
        )
        display.add_overlay(masked, cmap=cmap, colorbar=False, threshold=0.5)
        svg = extract_svg(display, compress=False)
        display.close()
        svgs.append(fromstring(svg.replace("figure_1", f"overlay-{mode}-{uuid4()}", 1)))
    compose_view(svgs, fg_svgs=None, out_file=str(out_file))
    return str(out_file)
