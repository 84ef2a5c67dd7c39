"""Atomic writes: the one place where files and folders are put into place (standard library only).

A reader (a later job, pybids, the validator, the group level) never sees a half-written file:
everything is written to a hidden temporary name in the destination folder, then moved into
place with :func:`os.replace` (atomic on POSIX file systems). A failed or interrupted write
leaves nothing behind; an ``OSError`` becomes :class:`~bids_siamfuse.errors.CannotWriteError`
(exit 73).

* :func:`atomic_path` - a context manager yielding the temporary path to write to;
* :func:`atomic_write` - the same for a ``write(tmp_path)`` callable; :func:`write_text`;
* :func:`publish_once` - first writer wins (parallel jobs creating one shared file);
* :func:`swap_folder` - replace a whole folder by a complete staging folder.

Only the standard library and :mod:`bids_siamfuse.errors` are imported, so ``model/`` (which
runs alone on GPU machines without nipype/pybids/nibabel) can use it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import CannotWriteError

__all__ = [
    "atomic_path",
    "atomic_write",
    "publish_once",
    "swap_folder",
    "umask",
    "write_text",
]


def umask() -> int:
    """The process umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _extension(path: Path) -> str:
    # keep ".nii.gz" whole: nibabel picks the format (and gzip) from the temporary name
    return "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix


def _temporary(path: Path) -> Path:
    """A new empty hidden file beside ``path`` (dot prefix: ignored by pybids/the validator)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".tmp{_extension(path)}", dir=path.parent
        )
    except OSError as exc:
        raise CannotWriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The temporary name starts with a dot and keeps the extension so writers that look at it
    (nibabel's ``.nii.gz``) behave. The file ends with mode ``0o644`` less the umask.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        os.chmod(tmp, 0o644 & ~umask())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CannotWriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp_path)`` then move into place (:func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def publish_once(path: Path, write: Callable[[Path], object], *, replace: bool = False) -> bool:
    """Create ``path`` from ``write(tmp_path)`` unless another writer got there first.

    Many jobs may start at once on one output folder: each writes a private temporary file and
    *hard-links* it into place, which fails for all but the first, so readers never see a
    partial file and no job overwrites another's. ``replace``: overwrite an existing file
    (atomically; e.g. a corrupt one). On file systems without hard links the last writer wins,
    still atomically. Returns whether this call's file was put in place.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o644 & ~umask())
        if replace or path.exists():
            if not replace:
                return False  # another job won the race; its file is complete
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False  # another job won the race; its file is complete
        except OSError:
            os.replace(tmp, path)
        return True
    except OSError as exc:
        raise CannotWriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def swap_folder(staging: Path, final: Path) -> None:
    """Replace ``final`` with the complete ``staging`` folder (the old one removed after).

    Two renames: a reader sees the old folder or the new one, never a mix; when the second
    rename fails the old folder is put back.
    """
    staging, final = Path(staging), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    try:
        staging.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
