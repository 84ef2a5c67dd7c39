"""Trained-model bundles: ``model.safetensors`` (weights) + ``model.json`` (everything else).

torch / numpy / safetensors only, so a bundle loads alone on a GPU machine.

``model.safetensors``
    The model's tensors (``FittedModel.state()[0]``) under their own names, and the region
    layout the model was trained on under ``layout.boxes``, ``layout.offsets`` and
    ``layout.local_index``, so a bundle plus a region file is all a prediction needs.

``model.json``
    ``format`` / ``format_version``; ``classes`` (first = reference); ``signature`` (atlas and
    grid, as in the region files); ``regions`` (names) and ``crop_boxes`` (x0 y0 z0 x1 y1 z1 on
    the grid, half-open); ``standardization`` (per-region mean/SD per modality, fit on the
    training subjects); ``model`` (the model's own metadata, ``FittedModel.state()[1]``);
    ``training`` (the TrainConfig and CV settings); ``cv_metrics``; ``cohort``; ``versions``;
    ``weights_sha256`` (ties the JSON to its weights file); ``created``.

Writes are atomic (a temporary file in the same folder, then :func:`os.replace`), weights first
and JSON last: a JSON present on disk always names complete weights, and a weights file that
does not match its JSON is refused at load time.

:func:`load_bundle` refuses (``DataError``, exit 65) a bundle that is not one, is incomplete,
whose weights do not match, or whose atlas/grid signature or crop boxes differ from the layout
of this installation.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import DataError, NoInputError
from .data import RegionLayout, check_signature

BUNDLE_FORMAT = "bids_siamfuse-model-bundle"
#: 2: ``content_sha256`` covers model.json's semantic content (classes, signature, settings)
BUNDLE_VERSION = 2
#: Keys of model.json whose content decides predictions; ``content_sha256`` covers them (with
#: the weights' hash), so an edited ``classes`` (reversed: every prediction flipped, exit 0)
#: is refused at load time.
CONTENT_KEYS = (
    "classes",
    "signature",
    "regions",
    "grid_shape",
    "crop_boxes",
    "standardization",
    "model",
    "training",
    "weights_sha256",
)
#: Deepest nesting accepted in model.json (ours is 4 levels deep; json.loads recursed until a
#: RecursionError on a deeply nested file).
MAX_JSON_DEPTH = 32
WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
_LAYOUT_KEYS = ("boxes", "offsets", "local_index")


def versions() -> dict:
    """Versions of what produced (or reads) a bundle."""
    import sklearn
    import torch

    from .._version import __version__

    out = {
        "bids_siamfuse": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
    }
    try:
        import safetensors

        out["safetensors"] = safetensors.__version__
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def save_bundle(
    folder: Path,
    *,
    tensors: dict,
    model_meta: dict,
    layout: RegionLayout,
    classes,
    standardization: dict,
    training: dict | None = None,
    cv_metrics: dict | None = None,
    cohort: dict | None = None,
    extra: dict | None = None,
    weights_dtype: str | None = None,
) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/model.json``; returns the JSON path.

    ``weights_dtype`` (default :data:`WEIGHTS_DTYPE`): the storage type of the siamese
    networks' float32 tensors (see :func:`storage_tensors`)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    clash = sorted(k for k in tensors if k.startswith("layout."))
    if clash:
        raise ValueError(f"tensor names reserved for the layout: {clash}")
    payload = storage_tensors(tensors, weights_dtype or WEIGHTS_DTYPE)
    payload["layout.boxes"] = np.ascontiguousarray(layout.boxes, dtype=np.int64)
    payload["layout.offsets"] = np.ascontiguousarray(layout.offsets, dtype=np.int64)
    payload["layout.local_index"] = np.ascontiguousarray(layout.local_index, dtype=np.int32)
    weights = folder / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(payload, str(tmp)))
    meta = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "classes": list(classes),
        "signature": dict(layout.signature),
        "regions": list(layout.names),
        "grid_shape": list(layout.grid_shape),
        "crop_boxes": np.asarray(layout.boxes).tolist(),
        "standardization": standardization,
        "model": model_meta,
        "training": training or {},
        "cv_metrics": cv_metrics or {},
        "cohort": cohort or {},
        "versions": versions(),
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": _sha256(weights),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    meta = _jsonable(meta)
    meta["content_sha256"] = content_hash(meta)
    path = folder / META_NAME
    text = json.dumps(_jsonable(meta), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


#: Storage type of the siamese networks' weights in ``model.safetensors``: "float32" or
#: "float16" (the first linear layers, 122M values, are 489 of the 505 MB). Loading
#: casts back to float32, so only the rounding of the stored values differs.
WEIGHTS_DTYPE = "float32"
#: the tensors rounded to float16 with ``weights_dtype="float16"``: the first linear layer of
#: every region network (122M of the 124.6M values); the convolutions and the embedding layer
#: (0.3 % of the bytes) keep float32, as the attention stage does
HALF_TENSORS = ("siamese.fc1.weight",)
#: largest magnitude stored in float16 (its maximum is 65504; far above any trained weight)
_HALF_MAX = 6.0e4


def storage_tensors(tensors: dict, weights_dtype: str = "float32") -> dict:
    """The tensors as written: C-contiguous NumPy arrays; with ``weights_dtype="float16"`` the
    float32 tensors of :data:`HALF_TENSORS` rounded to float16 (a tensor with a value beyond
    float16's range stays float32)."""
    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"weights_dtype must be float32 or float16, not {weights_dtype!r}")
    out = {}
    for k, v in tensors.items():
        a = np.asarray(v)
        if (
            weights_dtype == "float16"
            and k in HALF_TENSORS
            and a.dtype == np.float32
            and np.isfinite(a).all()
            and (a.size == 0 or float(np.abs(a).max()) < _HALF_MAX)
        ):
            a = a.astype(np.float16)
        out[k] = np.ascontiguousarray(a)
    return out


def bundle_paths(path: Path) -> tuple[Path, Path]:
    """(model.json, model.safetensors) of a bundle given as its folder or either file."""
    path = Path(path)
    if path.is_dir():
        meta = path / META_NAME
    elif path.suffix == ".safetensors":
        meta = path.with_suffix(".json")
    else:
        meta = path
    if not meta.is_file():
        raise NoInputError(f"model bundle {path}: no {meta.name} there")
    return meta, meta.with_suffix(".safetensors")


def content_hash(meta: dict) -> str:
    """sha256 of model.json's semantic content (:data:`CONTENT_KEYS`), canonical JSON."""
    content = {k: meta.get(k) for k in CONTENT_KEYS}
    text = json.dumps(_jsonable(content), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text (strings skipped), without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar_tree(value, depth: int = 0) -> bool:
    """JSON scalars, or lists of them (the atlas/grid signature's values)."""
    if isinstance(value, list):
        return depth < 3 and all(_scalar_tree(v, depth + 1) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def validate_meta(meta: dict, where: str) -> None:
    """Structure of model.json: every field the loader uses has the right shape (exit 65)."""

    def bad(key, expected):
        shown = json.dumps(meta.get(key))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise DataError(f"{where}: '{key}' must be {expected}, got {shown}")

    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        bad("format_version", "a positive integer")
    classes = meta.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c.strip() for c in classes)
        or len(set(classes)) != len(classes)
    ):
        bad("classes", "a list of at least two different, non-empty labels")
    signature = meta.get("signature")
    if (
        not isinstance(signature, dict)
        or not signature
        or not all(isinstance(k, str) and _scalar_tree(v) for k, v in signature.items())
    ):
        bad("signature", "an object of atlas/grid properties")
    boxes = meta.get("crop_boxes")
    if not isinstance(boxes, list) or not all(
        isinstance(b, list) and len(b) == 6 and all(_is_int(x) and x >= 0 for x in b)
        for b in boxes
    ):
        bad("crop_boxes", "a list of [x0, y0, z0, x1, y1, z1] integer boxes")
    regions = meta.get("regions", [])
    if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
        bad("regions", "a list of region names")
    if regions and len(regions) != len(boxes):
        raise DataError(f"{where}: {len(regions)} region names but {len(boxes)} crop boxes")
    grid = meta.get("grid_shape", [])
    if not isinstance(grid, list) or (grid and (len(grid) != 3 or not all(map(_is_int, grid)))):
        bad("grid_shape", "three integers")
    for key in ("model", "standardization"):
        if not isinstance(meta.get(key, {}), dict):
            bad(key, "an object")
    for key in ("weights_sha256", "content_sha256"):
        value = meta.get(key)
        if key in meta and not (
            isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")
        ):
            bad(key, "a sha256 hex digest")


def read_meta(path: Path) -> dict:
    """The bundle's JSON, checked for its format and structure (DataError); weights not read."""
    meta_path, _ = bundle_paths(path)
    try:
        text = meta_path.read_text()
        if _depth(text) > MAX_JSON_DEPTH:
            raise DataError(
                f"model bundle {meta_path}: JSON nested deeper than {MAX_JSON_DEPTH} levels"
            )
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as exc:
        raise DataError(f"model bundle {meta_path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise DataError(f"model bundle {meta_path}: not a bids_siamfuse model bundle")
    version = meta.get("format_version")
    if _is_int(version) and version > BUNDLE_VERSION:
        raise DataError(
            f"model bundle {meta_path}: format version {meta.get('format_version')} is newer "
            f"than this bids_siamfuse reads ({BUNDLE_VERSION}); upgrade bids_siamfuse"
        )
    for key in ("classes", "signature", "crop_boxes", "model", "weights_sha256"):
        if key not in meta:
            raise DataError(f"model bundle {meta_path}: '{key}' missing from the JSON")
    validate_meta(meta, f"model bundle {meta_path}")
    if version >= 2 and "content_sha256" not in meta:
        raise DataError(f"model bundle {meta_path}: 'content_sha256' missing from the JSON")
    return meta


def check_content(meta: dict, meta_path: Path) -> None:
    """model.json's semantic content matches the hash it was written with (exit 65)."""
    if "content_sha256" not in meta:  # format 1 (before the hash): weights hash only
        return
    if content_hash(meta) != meta["content_sha256"]:
        raise DataError(
            f"model bundle {meta_path}: model.json was changed after training (its classes, "
            "signature or settings no longer match content_sha256); use the bundle as written"
        )


def check_compatible(meta: dict, layout: RegionLayout, where: str = "model bundle") -> None:
    """Refuse (DataError, exit 65) a bundle made with another atlas, grid or crop boxes."""
    check_signature(
        meta["signature"], layout, where=where, than="this installation", remedy="retrain it here"
    )
    if np.asarray(meta["crop_boxes"]).tolist() != np.asarray(layout.boxes).tolist():
        raise DataError(f"{where}: its region crop boxes differ from this installation's")


@dataclass
class Bundle:
    """A loaded bundle: its JSON, tensors and layout; :meth:`model` rebuilds the model."""

    path: Path
    meta: dict
    tensors: dict
    layout: RegionLayout

    @property
    def classes(self) -> tuple:
        return tuple(self.meta["classes"])

    @property
    def signature(self) -> dict:
        return self.meta["signature"]

    def model(self, device: str = "cpu", model_cls=None):
        """The model, on ``device`` (``model_cls`` defaults to :func:`default_model_cls`)."""
        model_cls = model_cls or default_model_cls()
        try:
            return model_cls.from_state(
                self.tensors, self.meta["model"], self.layout, device=device
            )
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            # RuntimeError: torch's size mismatch of a tensor whose shape was edited
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise DataError(
                f"model bundle {self.path}: cannot rebuild the model "
                f"({type(exc).__name__}: {text})"
            ) from None


def default_model_cls():
    """The class bundles rebuild (``train.FittedModel``)."""
    from .train import FittedModel

    return FittedModel


def load_bundle(path: Path, *, layout: RegionLayout | None = None) -> Bundle:
    """Read and check a bundle. With ``layout``, it must match that layout (exit 65 if not)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    meta_path, weights = bundle_paths(path)
    meta = read_meta(meta_path)
    if layout is not None:  # "another atlas" says more than "changed": checked first
        check_compatible(meta, layout, where=f"model bundle {meta_path}")
    check_content(meta, meta_path)
    if not weights.is_file():
        raise DataError(f"model bundle {meta_path}: its weights file {weights.name} is missing")
    if _sha256(weights) != meta["weights_sha256"]:
        raise DataError(
            f"model bundle {meta_path}: {weights.name} does not match the JSON (changed or "
            "half-copied); copy both files of the bundle together"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"model bundle {weights}: unreadable weights ({exc})") from None
    missing = [k for k in _LAYOUT_KEYS if f"layout.{k}" not in tensors]
    if missing:
        raise DataError(f"model bundle {weights}: no layout tensors {missing}")
    bad = sorted(k for k, v in tensors.items() if v.dtype.kind == "f" and not np.isfinite(v).all())
    if bad:
        raise DataError(f"model bundle {weights}: non-finite values in {', '.join(bad[:5])}")
    boxes = tensors["layout.boxes"]
    if boxes.ndim != 2 or boxes.shape[1] != 6 or tensors["layout.offsets"].ndim != 1:
        raise DataError(f"model bundle {weights}: malformed layout tensors")
    own = RegionLayout(
        boxes=tensors.pop("layout.boxes").astype(np.int64),
        offsets=tensors.pop("layout.offsets").astype(np.int64),
        local_index=tensors.pop("layout.local_index").astype(np.int64),
        names=tuple(meta.get("regions", ())),
        grid_shape=tuple(meta.get("grid_shape", ())),
        signature=dict(meta["signature"]),
    )
    if layout is not None:
        check_compatible(meta, layout, where=f"model bundle {meta_path}")
        if own.n_voxels != layout.n_voxels or not np.array_equal(
            own.local_index, layout.local_index
        ):
            raise DataError(f"model bundle {meta_path}: its region voxels differ from this atlas")
        own = layout
    return Bundle(path=meta_path, meta=meta, tensors=tensors, layout=own)
