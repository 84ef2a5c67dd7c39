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
    """float32, reoriented to the closest RAS+ voxel order.

    niworkflows places the cuts evenly between the bounding box's first and last voxel: on a
    T1w stored LPS or PIR that runs the slices right-to-left or top-down, on a RAS one the
    other way (one session's panels top-down, the next bottom-up). In RAS+ voxel
    order every figure runs left-to-right, posterior-to-anterior, bottom-to-top.
    """
    import nibabel as nb

    img = nb.as_closest_canonical(_nii(img))
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
    cuts = {k: sorted(v) for k, v in cuts.items()}  # same slice order in every figure
    contour = _float(contour) if contour is not None else None
    views = [
        plot_registration(
            image,
            role,
            estimate_brightness=True,
            cuts=cuts,
            label=label,
            contour=contour,
            compress=False,
        )
        for image, role, label in (
            (fixed, "fixed-image", fixed_label),
            (moved, "moving-image", moved_label),
        )
    ]
    compose_view(*views, out_file=str(out_file))
    return str(out_file)


def label_boundaries(labels: np.ndarray, axes=(0, 1, 2)) -> np.ndarray:
    """Thin outlines: voxels whose next voxel along one of ``axes`` has another label.

    One-sided (a boundary is drawn once, one voxel wide) and, for a slice figure, ``axes``
    the two in-plane axes: a boundary that runs through the slice plane would otherwise paint
    whole patches (the AAL figure was mostly solid colour before).
    """
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in axes:
        nxt = np.roll(labels, -1, axis=axis)
        edge |= (labels != nxt) & ((labels > 0) | (nxt > 0))
    return edge


def upsample_labels(labels: np.ndarray, affine: np.ndarray, factor: int = 2):
    """(labels, affine) on a grid ``factor`` times finer (nearest neighbour), so outlines
    drawn on it are ``1/factor`` as thick (0.75 mm on the 1.5 mm grid)."""
    fine = labels
    for axis in range(3):
        fine = np.repeat(fine, factor, axis=axis)
    scale = np.diag([1.0 / factor] * 3 + [1.0])
    shift = np.eye(4)
    shift[:3, 3] = -(factor - 1) / (2.0 * factor)  # voxel centres of the finer grid
    return fine, np.asarray(affine) @ shift @ scale


def in_plane_boundaries(labels: np.ndarray) -> dict:
    """Per display mode (nilearn's ``x``, ``y``, ``z``), the outlines within that plane."""
    return {
        "x": label_boundaries(labels, axes=(1, 2)),
        "y": label_boundaries(labels, axes=(0, 2)),
        "z": label_boundaries(labels, axes=(0, 1)),
    }


def overlay_svg(anat, overlay, out_file, *, bbox=None, cmap="autumn", label=None) -> str:
    """A raster overlay (e.g. region boundaries) over ``anat``, three rows of seven cuts."""
    from uuid import uuid4

    import nibabel as nb
    from nilearn.plotting import plot_anat
    from niworkflows.viz.utils import compose_view, cuts_from_bbox, extract_svg
    from svgutils.transform import fromstring

    anat = _float(anat)
    # one overlay for every plane, or one per display mode ({"x": img, "y": img, "z": img})
    overlays = overlay if isinstance(overlay, dict) else dict.fromkeys("xyz", overlay)
    cuts = cuts_from_bbox(_float(bbox) if bbox is not None else anat, cuts=7)
    svgs = []
    for i, mode in enumerate(("z", "x", "y")):
        ov = _float(overlays[mode])
        masked = nb.Nifti1Image((ov.get_fdata() > 0).astype(np.float32), ov.affine)
        display = plot_anat(
            anat,
            display_mode=mode,
            cut_coords=sorted(cuts[mode]),
            colorbar=False,
            title=label if i == 0 else None,
        )
        display.add_overlay(masked, cmap=cmap, colorbar=False, threshold=0.5)
        svg = extract_svg(display, compress=False)
        display.close()
        svgs.append(fromstring(svg.replace("figure_1", f"overlay-{mode}-{uuid4()}", 1)))
    compose_view(svgs, fg_svgs=None, out_file=str(out_file))
    return str(out_file)
