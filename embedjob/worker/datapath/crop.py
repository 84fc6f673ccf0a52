"""Stages 2 + 3 for one image — its bytes to what the batch needs (:func:`prepare_image`):

- :class:`Crop`: the uint8 ``[224, 224, 3]`` crop of the reference transform (or of the opt-in
  fast path), with the original width and height;
- :class:`EncodedJpeg`: only with ``device_jpeg`` (the CUDA fast path): a baseline RGB/grey JPEG
  whose header was checked here, left encoded for the GPU's nvJPEG decoder (gpu_decode.py);
- :class:`Rejected`: why the image cannot be embedded (recorded in the manifest, never raised).

Torch-free: it runs in the decode processes (decode_pool.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from embedjob.worker.datapath.decode import DecodeError, load_image, open_image
from embedjob.worker.datapath.preprocess import IMAGE_SIZE, PreprocessError, reference_crop
from embedjob.worker.model.transform import DEFAULT_TRANSFORM, ImageTransform

# What a manifest records for preprocessing "fast" ("exact" records preprocess.PREPROCESSING_ID).
FAST_PREPROCESSING_ID = "embedjob-fast-v1"
# The fast CPU path decodes JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``draft``)
# but never below this multiple of the target, then applies the exact bicubic resize.
DRAFT_FACTOR = 2


@dataclass
class Crop:
    pixels: np.ndarray  # uint8 [224, 224, 3]
    width: int  # the original image's size (for the metadata)
    height: int
    decode_s: float
    preprocess_s: float
    path: str  # "exact" | "cpu-draft": how it was made (counted in the manifest)


@dataclass
class EncodedJpeg:
    # The JPEG's bytes: bytes, or in the worker a uint8 view of its batch slot's JPEG room
    # (batch_slots.py), valid until the slot is given back.
    data: bytes | np.ndarray
    width: int
    height: int
    decode_s: float  # header parsing only; the decode itself happens on the device


@dataclass
class Rejected:
    reason: str
    decode_s: float = 0.0
    preprocess_s: float = 0.0


Prepared = Crop | EncodedJpeg | Rejected


def draft_request(width: int, height: int, short_side: int = DRAFT_FACTOR * IMAGE_SIZE) -> tuple[int, int]:
    """The size to ask Pillow's ``draft`` for: the image scaled so its short side is ``short_side``
    (rounded up). ``draft`` picks the largest DCT scale (1/2, 1/4, 1/8) that stays at least this
    big on both sides, so the decoded image never has a short side below ``short_side``."""
    if width <= height:
        return short_side, -(-short_side * height // width)
    return -(-short_side * width // height), short_side


def _device_jpeg_ok(img: object, data: bytes) -> bool:
    """Worth handing to nvJPEG: a complete (ends with EOI) baseline or progressive JPEG in RGB or
    grey. CMYK, odd modes and truncated files take the CPU path, which records or converts them."""
    return getattr(img, "format", None) == "JPEG" and getattr(img, "mode", None) in ("RGB", "L") and (
        data.rstrip(b"\0")[-2:] == b"\xff\xd9")


def prepare_image(data: bytes, max_pixels: int, preprocessing: str = "exact", device_jpeg: bool = False,
                  transform: ImageTransform = DEFAULT_TRANSFORM) -> Prepared:
    """Decode + preprocess one image with ``transform`` (the model's). Never raises: every problem is a
    :class:`Rejected` reason. The fast CPU path (DCT-domain draft) applies to the ``clip`` resize rule
    (any size); a ``squash`` transform (SigLIP) always takes the exact path."""
    t0 = time.perf_counter()
    try:
        img = open_image(data, max_pixels)
        width, height = img.size
        if device_jpeg and _device_jpeg_ok(img, data):
            img.close()
            return EncodedJpeg(data, width, height, time.perf_counter() - t0)
        path = "exact"
        if preprocessing == "fast" and img.format == "JPEG" and transform.rule == "clip":
            req = draft_request(width, height, DRAFT_FACTOR * transform.resize)
            if min(width // req[0], height // req[1]) >= 2 and img.draft(None, req) is not None:
                path = "cpu-draft"
        img = load_image(img)
    except DecodeError as e:
        return Rejected(e.reason, decode_s=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a bad image must never fail the shard
        return Rejected(f"decode: {type(e).__name__}: {e}", decode_s=time.perf_counter() - t0)
    t1 = time.perf_counter()
    try:
        crop = reference_crop(img, source_size=(width, height), transform=transform)
    except PreprocessError as e:
        return Rejected(e.reason, t1 - t0, time.perf_counter() - t1)
    except Exception as e:  # noqa: BLE001
        return Rejected(f"preprocess: {type(e).__name__}: {e}", t1 - t0, time.perf_counter() - t1)
    finally:
        img.close()
    return Crop(crop, width, height, t1 - t0, time.perf_counter() - t1, path)


def prepare_images(datas: list[bytes], max_pixels: int, preprocessing: str = "exact",
                   device_jpeg: bool = False, transform: ImageTransform = DEFAULT_TRANSFORM) -> list[Prepared]:
    """:func:`prepare_image` on each of ``datas``, in order (in this process)."""
    return [prepare_image(d, max_pixels, preprocessing, device_jpeg, transform) for d in datas]
