"""Stages 2 + 3 on the GPU — the opt-in fast path on CUDA (``spec.inference.preprocessing: fast``):
JPEGs decoded by nvJPEG in batches (torchvision ``decode_jpeg`` on the device), then resized and
center-cropped on the device with the reference geometry (short side 224 with torchvision's rounding,
the same crop offsets) and an antialiased bicubic filter.

Not bit-identical to the reference: nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a
grey level here and there, and the resize is computed in float32 rather than Pillow's fixed point.
``embedjob bench --preprocessing fast`` measures the deviation (PSNR, mean absolute difference,
embedding cosine); manifests record ``preprocessing: embedjob-fast-v1``.

The decode workers send here only complete RGB or grey JPEGs whose header they checked (size limit
included); every other image, and any JPEG nvJPEG refuses, takes the CPU path, per image.

torchvision is optional: it is imported only when this path is used, and its absence is reported
naming the field that asked for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from embedjob.worker.datapath.preprocess import IMAGE_SIZE, center_crop_box, resized_size
from embedjob.worker.model.load import torch

# Decoded images in, one result per image out: a uint8 [3, H, W] tensor on the device, or the
# exception that image raised.
JpegDecoder = Callable[[list[bytes], Any], list[Any]]


class DeviceDecodeUnavailable(RuntimeError):
    """The fast path on CUDA was asked for, but this worker cannot decode on the device."""


def nvjpeg_decoder() -> JpegDecoder:
    """torchvision's batched ``decode_jpeg`` on the device; raises :class:`DeviceDecodeUnavailable`
    (naming ``spec.inference.preprocessing``) when torchvision is not installed."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:
        raise DeviceDecodeUnavailable(
            "spec.inference.preprocessing: 'fast' on CUDA decodes JPEGs on the GPU with torchvision's nvJPEG "
            f"decoder, and torchvision is not installed in this worker ({e}). Install the torchvision build "
            f"that matches torch {torch.__version__}, or use preprocessing: exact") from e

    def decode(datas: list[bytes], device: Any) -> list[Any]:
        tensors = [torch.from_numpy(np.frombuffer(d, dtype=np.uint8).copy()) for d in datas]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except Exception:  # noqa: BLE001 - one bad image fails the batched call: find it, one by one
            out: list[Any] = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                except Exception as e:  # noqa: BLE001 - that image falls back to the CPU path
                    out.append(e)
            return out

    return decode


def resize_crop(images: list[Any]) -> list[Any]:
    """The reference geometry on the device: each uint8 ``[3, H, W]`` image resized (antialiased
    bicubic, in float32, rounded) so its short side is 224, then center-cropped; returns uint8
    ``[224, 224, 3]`` tensors. Images of the same size are resized in one call."""
    out: list[Any] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault((int(img.shape[2]), int(img.shape[1])), []).append(i)
    for (width, height), idx in groups.items():
        x = torch.stack([images[i] for i in idx]).to(torch.float32)
        new_w, new_h = resized_size(width, height)
        if (new_w, new_h) != (width, height):
            x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True,
                                                align_corners=False)
            x = x.round_().clamp_(0, 255)
        left, top, right, bottom = center_crop_box(new_w, new_h)
        crops = x[:, :, top:bottom, left:right].to(torch.uint8).permute(0, 2, 3, 1)
        for k, i in enumerate(idx):
            out[i] = crops[k]
    return out


def device_crops(datas: list[bytes], device: Any, decoder: JpegDecoder) -> list[Any]:
    """Decode + resize + crop on ``device``: per image a uint8 ``[224, 224, 3]`` device tensor, or
    the exception that made it fall back to the CPU path."""
    decoded = decoder(datas, device)
    good = [i for i, d in enumerate(decoded) if not isinstance(d, BaseException)]
    out: list[Any] = list(decoded)
    for i, crop in zip(good, resize_crop([decoded[i] for i in good]), strict=True):
        if tuple(crop.shape) != (IMAGE_SIZE, IMAGE_SIZE, 3):
            crop = ValueError(f"unexpected device crop shape {tuple(crop.shape)}")
        out[i] = crop
    return out
