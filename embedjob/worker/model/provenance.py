"""What the records say about the model: only what was really loaded.

A hub model is its id and revision. A local folder (``spec.model.path``) is never given a hub id or
revision it was not loaded from: it is recorded as the folder, the name its own ``config.json``
carries (``_name_or_path``, when it has one), its family and embedding size, and a content hash of
its weight files, which is the same whatever the folder is called or wherever it is copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors",)
_CHUNK = 8 << 20
_hashes: dict[tuple[str, int, int], str] = {}  # (file, size, mtime_ns) -> sha256: hashed once per process
_lock = threading.Lock()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _hashes:
            return _hashes[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _hashes[key] = digest
    return digest


def weights_sha256(folder: str | os.PathLike[str]) -> str | None:
    """One sha256 over the folder's weight files: each file's path relative to the folder and its
    content's sha256, in name order. Independent of the folder's own name and location; None when
    the folder holds no weight file."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{_file_sha256(p)}\n".encode())
    return h.hexdigest()


def family(model_type: str | None, vision: Any) -> str:
    """``clip ViT-L/14`` style: the model type and the vision tower's shape (width, depth, patch)."""
    width, layers, patch = (getattr(vision, k, None) for k in ("hidden_size", "num_hidden_layers", "patch_size"))
    known = {(768, 12, 32): "ViT-B/32", (768, 12, 16): "ViT-B/16", (1024, 24, 14): "ViT-L/14",
             (1280, 32, 14): "ViT-H/14", (1664, 48, 14): "ViT-bigG/14"}
    shape = known.get((width, layers, patch)) or f"ViT width {width}, {layers} layers, patch {patch}"
    return f"{model_type or 'clip'} {shape}"


def describe_source(name: str | None, revision: str | None, path: str | None, vision: Any,
                    dim: int) -> dict[str, Any]:
    """The identifying part of a manifest's ``model`` block."""
    model_type = str(getattr(vision, "model_type", "clip")).removesuffix("_vision_model")
    if not path:
        return {"id": name, "revision": revision, "source": name, "dim": dim,
                "family": family(model_type, vision)}
    folder = Path(path).resolve()
    config: dict[str, Any] = {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        pass
    own_name = config.get("_name_or_path") or None
    if own_name and (os.path.isabs(own_name) or own_name.startswith(".")):
        own_name = None  # save_pretrained of a local model writes where it was loaded from: not a name
    return {"path": str(folder), "source": str(folder), "name": own_name,
            "family": family(config.get("model_type"), vision), "dim": dim,
            "weightsSha256": weights_sha256(folder)}
