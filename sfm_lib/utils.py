"""Small shared helpers: devices, cache folder, atomic file writes, safetensors + JSON metadata."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["resolve_device", "cache_dir", "atomic_path", "write_json", "DiskFullError", "save_tensors",
           "load_tensors"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` → CUDA if available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    return dev


def cache_dir() -> Path:
    """Folder for re-usable artefacts (feature caches, statistics): ``$SFM_CACHE`` or ``~/.cache/sfm_lib``."""
    path = Path(os.environ.get("SFM_CACHE", Path.home() / ".cache" / "sfm_lib"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (atomic on POSIX).

    On an exception the temporary file is removed and whatever was at ``path`` stays untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) make 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(err, Exception) and _disk_full(err, path.parent):
            kept = f"the earlier {path.name} is kept as it was" if path.exists() else "nothing was written"
            raise DiskFullError(errno.ENOSPC, f"the disk is full: could not write {path} ({kept}); free some "
                                              f"space on {path.parent} or write elsewhere") from err
        raise


def write_json(path: str | os.PathLike, payload: Any, indent: int = 1) -> None:
    """``payload`` as JSON at ``path``, atomically (:func:`atomic_path`): strict JSON (no NaN), values that
    JSON has no type for (paths, dates) as their ``str``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=indent, allow_nan=False, default=str) + "\n")


class DiskFullError(OSError):
    """Writing a file failed because its disk (or quota) is full; the message names the file."""

    def __str__(self) -> str:
        return self.strerror


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` (or its cause) is a full disk: ENOSPC/EDQUOT, or a writer's own error (torch.save says
    "unexpected pos …") while the folder's disk has next to no space left."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` as safetensors with ``meta`` JSON-encoded in the header, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"sfm_lib": json.dumps(meta)})


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors` → (tensors, meta). No pickled code is run."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    meta = json.loads(header["sfm_lib"]) if "sfm_lib" in header else {}
    return tensors, meta
