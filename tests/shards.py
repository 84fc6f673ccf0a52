"""Build WebDataset test shards: deterministic synthetic images in every shape a real crawl has
(formats, modes, sizes, aspect ratios) plus the broken ones (empty, truncated, garbage, bombs)."""

from __future__ import annotations

import functools
import io
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


# -- pixels -------------------------------------------------------------------------------------------
def pattern(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth gradients + noise + a few hard edges, so resampling filters and crop offsets show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    out = []
    for c in range(channels):
        fx, fy = rng.uniform(1, 6, size=2)
        base = 127 + 90 * np.sin(2 * np.pi * (fx * x / max(width, 1) + fy * y / max(height, 1) + c / 3))
        base += rng.normal(0, 12, size=base.shape)
        base[(x.astype(int) // 7 + y.astype(int) // 5) % 11 == 0] = 255 * (c % 2)
        out.append(base)
    return np.clip(np.stack(out, axis=-1), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(pattern(width, height, seed), "RGB")


def rgba(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(pattern(width, height, seed, channels=4), "RGBA")


def grey(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(pattern(width, height, seed, channels=1)[..., 0], "L")


def palette_with_transparency(width: int, height: int, seed: int = 0) -> Image.Image:
    img = rgb(width, height, seed).quantize(colors=64)
    img.info["transparency"] = 3  # palette index 3 is transparent
    return img


def sixteen_bit(width: int, height: int, seed: int = 0) -> Image.Image:
    arr = pattern(width, height, seed, channels=1)[..., 0].astype(np.uint16) * 257
    return Image.fromarray(arr)  # mode I;16


def float_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(pattern(width, height, seed, channels=1)[..., 0].astype(np.float32) / 255.0, "F")


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header that claims ``width x height`` pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png_with_padding(width: int, height: int, pad_bytes: int, seed: int = 0) -> bytes:
    """A small, fast-to-decode PNG made ``pad_bytes`` larger by a private ancillary chunk (which
    decoders skip): big members without big decode cost."""
    data = encode(rgb(width, height, seed), "PNG")
    kind = b"prVt"
    pad = b"\0" * pad_bytes
    extra = struct.pack(">I", len(pad)) + kind + pad + struct.pack(">I", zlib.crc32(kind + pad) & 0xFFFFFFFF)
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + extra + data[iend:]


# -- the varied image set --------------------------------------------------------------------------------
@functools.cache
def varied_images() -> dict[str, tuple[str, bytes]]:
    """name -> (extension, encoded bytes) of every decodable kind of input the worker must embed."""
    cmyk = rgb(260, 300, 7).convert("CMYK")
    return {
        "jpg_landscape": ("jpg", encode(rgb(640, 480, 1), "JPEG", quality=90)),
        "jpg_portrait_odd": ("jpeg", encode(rgb(301, 517, 2), "JPEG")),
        "png_rgb": ("png", encode(rgb(333, 250, 3), "PNG")),
        "webp": ("webp", encode(rgb(400, 225, 4), "WEBP", quality=80)),
        "upper_jpg": ("JPG", encode(rgb(225, 226, 5), "JPEG")),
        "upper_png": ("PNG", encode(rgb(224, 224, 6), "PNG")),
        "grey_jpg": ("jpg", encode(grey(350, 280, 8), "JPEG")),
        "rgba_png": ("png", encode(rgba(300, 301, 9), "PNG")),
        "palette_transparent_png": ("png", encode(palette_with_transparency(257, 240, 10), "PNG")),
        "palette_gif": ("gif", encode(palette_with_transparency(230, 300, 11), "GIF")),
        "cmyk_jpg": ("jpg", encode(cmyk, "JPEG")),
        "progressive_jpg": ("jpg", encode(rgb(500, 375, 12), "JPEG", progressive=True, quality=85)),
        "small": ("png", encode(rgb(31, 17, 13), "PNG")),
        "tiny_1px": ("png", encode(rgb(1, 1, 14), "PNG")),
        "wide": ("jpg", encode(rgb(2000, 20, 15), "JPEG")),
        "tall": ("png", encode(rgb(20, 2000, 16), "PNG")),
        "bmp": ("bmp", encode(rgb(227, 229, 17), "BMP")),
        "tiff": ("tiff", encode(rgb(240, 260, 18), "TIFF")),
        "la_png": ("png", encode(grey(260, 250, 19).convert("LA"), "PNG")),
        "binary_png": ("png", encode(grey(250, 240, 20).convert("1"), "PNG")),
        # Modes the reference transform mishandles (clips to white): the worker converts first.
        "sixteen_bit_png": ("png", encode(sixteen_bit(300, 240, 21), "PNG")),
        "float_tiff": ("tif", encode(float_image(240, 300, 22), "TIFF")),
    }


# Inputs the reference transform itself cannot handle sensibly (see worker/preprocess.py).
NON_REFERENCE = frozenset({"sixteen_bit_png", "float_tiff"})


def broken_images() -> dict[str, tuple[str, bytes]]:
    """name -> (extension, bytes) of inputs that must be skipped and recorded, never embedded."""
    good_jpeg = encode(rgb(400, 300, 30), "JPEG")
    return {
        "zero_bytes": ("jpg", b""),
        "truncated_jpg": ("jpg", good_jpeg[: len(good_jpeg) // 2]),
        "garbage": ("png", b"this is not an image at all \x00\x01\x02" * 10),
        "bomb": ("png", png_bomb()),
    }


# -- tars ------------------------------------------------------------------------------------------------
@dataclass
class ShardSpec:
    """What a built shard holds, in tar order, so tests can assert exact outcomes."""

    members: list[tuple[str, bytes]] = field(default_factory=list)
    good_keys: list[str] = field(default_factory=list)  # image samples that must be embedded, in order
    failed_keys: list[str] = field(default_factory=list)  # image samples that must be recorded as failed
    captions: dict[str, str] = field(default_factory=dict)
    jsons: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def tar_bytes(self) -> bytes:
        return tar_bytes(self.members)

    def members_by_key(self) -> dict[str, bytes]:
        """key -> the bytes of its image member."""
        out = {}
        for name, data in self.members:
            key, _, ext = name.rpartition("/")[2].partition(".")
            folder = name.rpartition("/")[0]
            if ext.lower() in {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}:
                out[f"{folder}/{key}" if folder else key] = data
        return out

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.tar_bytes())
        return path


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000  # deterministic bytes
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def varied_shard() -> ShardSpec:
    """Every varied and broken image, some with sidecars, some in sub-folders, one ignored member."""
    spec = ShardSpec()
    good = varied_images()
    broken = broken_images()
    order = [
        "jpg_landscape", "zero_bytes", "upper_jpg", "png_rgb", "garbage", "webp", "jpg_portrait_odd",
        "grey_jpg", "rgba_png", "truncated_jpg", "palette_transparent_png", "palette_gif", "cmyk_jpg",
        "progressive_jpg", "bomb", "small", "tiny_1px", "wide", "tall", "bmp", "tiff", "la_png",
        "binary_png", "upper_png", "sixteen_bit_png", "float_tiff",
    ]
    assert set(order) == set(good) | set(broken)
    for i, name in enumerate(order):
        folder = "nested/deeper/" if i % 5 == 2 else ("nested/" if i % 7 == 3 else "")
        key = f"{folder}{i:04d}_{name}"
        ext, data = good.get(name) or broken[name]
        if i % 3 == 0:
            caption = f"caption for {name} ✓"
            spec.members.append((f"{key}.txt", caption.encode()))
            spec.captions[key] = caption
        spec.members.append((f"{key}.{ext}", data))
        if i % 4 == 1:
            sidecar = f'{{"index": {i}, "name": "{name}"}}'
            spec.members.append((f"{key}.json", sidecar.encode()))
            spec.jsons[key] = sidecar
        if i == 6:
            spec.members.append((f"{key}.cls", b"7"))  # not an image, caption or json: ignored
        if name in good:
            spec.good_keys.append(key)
            spec.sizes[key] = Image.open(io.BytesIO(data)).size
        else:
            spec.failed_keys.append(key)
    spec.members.append(("README", b"a member without a key is ignored"))
    return spec


def simple_shard(n: int, seed: int = 0, size: tuple[int, int] = (256, 192), prefix: str = "") -> ShardSpec:
    """``n`` ordinary JPEGs with captions."""
    spec = ShardSpec()
    for i in range(n):
        key = f"{prefix}{i:06d}"
        w, h = size[0] + (i * 13) % 50, size[1] + (i * 7) % 40
        data = encode(rgb(w, h, seed * 100_003 + i), "JPEG", quality=85)
        caption = f"image {i}"
        spec.members += [(f"{key}.jpg", data), (f"{key}.txt", caption.encode())]
        spec.good_keys.append(key)
        spec.captions[key] = caption
        spec.sizes[key] = (w, h)
    return spec


def caption_shard() -> ShardSpec:
    """Images with every kind of caption a crawl has: HTML entities, mojibake, emoji, one longer than
    the context, empty, whitespace, bytes that are not UTF-8, none at all, one only in the JSON, and a
    broken image that has a caption (no row, so no text row either). ``captions`` holds the caption as
    the tar reader decodes it."""
    long_caption = " ".join(f"word{i}" for i in range(300))
    cases: list[tuple[str, bytes | None, str | None]] = [  # (name, .txt bytes, .json)
        ("entities", b"Tom &amp; Jerry &lt;3", None),
        ("missing", None, None),
        ("empty", b"", None),
        ("not_utf8", b"caf\xe9 \xff\xfe au lait", None),
        ("broken_image", b"a caption of an image that does not decode", None),
        ("long", long_caption.encode(), None),
        ("mojibake", "Ã©tÃ© Ã  la plage".encode(), '{"caption": "json caption of mojibake"}'),
        ("emoji", "a 🐶 and a 🐱 🏳️‍🌈".encode(), None),
        ("json_only", None, '{"caption": "Only in the &quot;JSON&quot;", "other": 1}'),
        ("whitespace", b" \t\n ", '{"caption": 7}'),
    ]
    spec = ShardSpec()
    broken = broken_images()["truncated_jpg"][1]
    for i, (name, txt, sidecar) in enumerate(cases):
        key = f"{i:04d}_{name}"
        data = broken if name == "broken_image" else encode(rgb(160 + 8 * i, 120 + 4 * i, 900 + i), "JPEG")
        spec.members.append((f"{key}.jpg", data))
        if txt is not None:
            spec.members.append((f"{key}.txt", txt))
            spec.captions[key] = txt.decode("utf-8", errors="replace")
        if sidecar is not None:
            spec.members.append((f"{key}.json", sidecar.encode()))
            spec.jsons[key] = sidecar
        if name == "broken_image":
            spec.failed_keys.append(key)
        else:
            spec.good_keys.append(key)
            spec.sizes[key] = Image.open(io.BytesIO(data)).size
    return spec
