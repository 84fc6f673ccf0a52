"""Synthetic WebDataset shards for the benchmark: photo-like JPEGs at a chosen size, written through
embedjob's storage code (local disk or S3)."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import numpy as np

from embedjob.storage import Storage, join

SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "256": ((256, 256),),
    "500x375": ((500, 375),),
    "1mp": ((1200, 900),),
    "mix": ((256, 256), (500, 375), (375, 500), (1200, 900), (640, 427)),
}


def synthetic_image(width: int, height: int, seed: int) -> Any:
    """A photo-like RGB image: smooth colour fields, hard-edged shapes, fine texture and sensor-like
    noise, so JPEG sizes, decode cost and resampling differences resemble real crawled images."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((width, height),
                                                                                  Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(14):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, max(9, width // 3))), y0 + int(rng.integers(8, max(9, height // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    arr = np.asarray(base, dtype=np.int16)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = arr + (12 * np.sin(xx / rng.uniform(2, 9)) * np.cos(yy / rng.uniform(2, 9)))[..., None].astype(np.int16)
    arr = arr + rng.normal(0, 5, arr.shape).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img.filter(ImageFilter.GaussianBlur(0.6))


def synthetic_jpegs(size: str, n: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` distinct encoded JPEGs, cycling through the sizes of ``size``."""
    from PIL import Image

    dims = SIZES[size]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        synthetic_image(*dims[i % len(dims)], seed=seed * 100_003 + i).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    Image.init()
    return out


def make_shards(root: str, storage: Storage, size: str, count: int, per_shard: int, seed: int = 0,
                quality: int = 90, distinct: int = 24) -> list[str]:
    """Write ``count`` WebDataset shards of ``per_shard`` samples (``.jpg`` + ``.txt`` + ``.json``)
    under ``root``; returns their URIs. ``distinct`` different JPEGs are cycled (decoding costs the
    same whether or not two images are equal; encoding thousands of large images would not)."""
    jpegs = synthetic_jpegs(size, min(distinct, count * per_shard), seed, quality)
    uris = []
    for s in range(count):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:06d}"
                data = jpegs[(s * 7 + i) % len(jpegs)]
                for ext, payload in (("jpg", data), ("txt", f"synthetic image {key}".encode()),
                                     ("json", json.dumps({"key": key, "bytes": len(data)}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(payload))
        uri = join(root, f"{s:05d}.tar")
        storage.put_atomic(uri, buf.getvalue(), tmp_root=join(root, "_tmp"))
        uris.append(uri)
    return uris


