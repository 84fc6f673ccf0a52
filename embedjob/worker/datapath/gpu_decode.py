"""Stages 2 + 3 on the GPU — the opt-in fast path on CUDA (``spec.inference.preprocessing: fast``):
JPEGs decoded by nvJPEG in batches (torchvision ``decode_jpeg`` on the device), then resized and
cropped on the device with the model's geometry (its ImageTransform) and an antialiased bicubic
filter: for CLIP (every size) the short side resized to ``resize`` with torchvision's rounding and the
same center-crop offsets; for SigLIP's squash the whole image resized to ``crop`` x ``crop``.

Not bit-identical to the reference: nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a
grey level here and there, and the resize is computed in float32 rather than Pillow's fixed point.
``embedjob bench --preprocessing fast`` measures the deviation (PSNR, mean absolute difference,
embedding cosine); manifests record ``preprocessing: embedjob-fast-v1`` (with the transform's id
after a colon for any model other than OpenAI CLIP at 224 px).

The decode workers send here only complete RGB or grey JPEGs whose header they checked (size limit
included), their bytes left in the batch slot's JPEG room (batch_slots.py) and used from there in
place; every other image, and any JPEG nvJPEG refuses, takes the CPU path, per image.

torchvision is optional: it is imported only when this path is used, and its absence is reported
naming the field that asked for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from embedjob.worker.datapath.preprocess import center_crop_box, resized_size
from embedjob.worker.model.torch_env import torch
from embedjob.worker.model.transform import DEFAULT_TRANSFORM, ImageTransform

# Decoded images in, one result per image out: a uint8 [3, H, W] tensor on the device, or the
# exception that image raised.
JpegDecoder = Callable[[list[bytes | np.ndarray], Any], list[Any]]


class DeviceDecodeUnavailable(RuntimeError):
    """The fast path on CUDA was asked for, but this worker cannot decode on the device."""


def jpeg_tensor(data: bytes | np.ndarray) -> Any:
    """The uint8 CPU tensor nvJPEG is given for one JPEG: a view of a batch slot's JPEG room is used
    in place; bytes are copied (torch wants a writable buffer)."""
    return torch.from_numpy(data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8).copy())


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

    def decode(datas: list[bytes | np.ndarray], device: Any) -> list[Any]:
        tensors = [jpeg_tensor(d) for d in datas]
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


def device_geometry(width: int, height: int,
                    transform: ImageTransform) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The resized size ``(w, h)`` and the crop box ``(left, top, right, bottom)`` in it of a
    ``width`` x ``height`` image under ``transform``: the reference's own geometry."""
    if transform.rule == "squash":
        return (transform.crop, transform.crop), (0, 0, transform.crop, transform.crop)
    new = resized_size(width, height, transform.resize)
    return new, center_crop_box(*new, size=transform.crop)


def resize_crop_into(images: list[Any], out: Any, index: Any = None,
                     transform: ImageTransform = DEFAULT_TRANSFORM) -> None:
    """The reference geometry of ``transform`` on the device, in batches: each uint8 ``[3, H, W]``
    image resized (antialiased bicubic, in float32, rounded) and cropped as the model's transform says
    (OpenAI CLIP's by default: short side 224, center crop), and written to ``out[index[k]]`` (uint8
    ``[N, crop, crop, 3]``; ``index``: a list of rows of ``out``, default 0..len-1). Images of the same
    size are resized in one call and written in one copy; the only per-image work is reading their
    sizes."""
    rows = list(range(len(images))) if index is None else list(index)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault((int(img.shape[2]), int(img.shape[1])), []).append(k)
    for (width, height), members in groups.items():
        x = (images[members[0]].unsqueeze(0) if len(members) == 1
             else torch.stack([images[k] for k in members])).to(torch.float32)
        (new_w, new_h), (left, top, right, bottom) = device_geometry(width, height, transform)
        if (new_w, new_h) != (width, height):
            x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True,
                                                align_corners=False)
            x = x.round_().clamp_(0, 255)
        crops = x[:, :, top:bottom, left:right].to(torch.uint8).permute(0, 2, 3, 1)
        targets = [rows[k] for k in members]
        if targets == list(range(targets[0], targets[0] + len(targets))):
            out[targets[0]:targets[-1] + 1].copy_(crops)  # consecutive rows (a batch of one size): no index
        else:  # an index from pageable memory: a copy the host waits for
            out.index_copy_(0, torch.tensor(targets, dtype=torch.long, device=out.device), crops)


def resize_crop(images: list[Any], transform: ImageTransform = DEFAULT_TRANSFORM) -> list[Any]:
    """:func:`resize_crop_into` for a list: uint8 ``[crop, crop, 3]`` tensors, one per image."""
    if not images:
        return []
    side = transform.crop
    out = torch.empty((len(images), side, side, 3), dtype=torch.uint8, device=images[0].device)
    resize_crop_into(images, out, transform=transform)
    return list(out.unbind(0))


def decode_into(datas: list[bytes | np.ndarray], out: Any, rows: list[int], decoder: JpegDecoder,
                transform: ImageTransform = DEFAULT_TRANSFORM) -> dict[int, BaseException]:
    """Decode ``datas`` on ``out``'s device in one batched call, resize and crop them in batches
    (``transform``: the model's), and write image k to ``out[rows[k]]``. Returns ``{k: exception}``
    for the images the decoder refused (their rows are left as they were)."""
    decoded = decoder(datas, out.device)
    failed = {k: d for k, d in enumerate(decoded) if isinstance(d, BaseException)}
    good = [k for k in range(len(decoded)) if k not in failed]
    if good:
        resize_crop_into([decoded[k] for k in good], out, [rows[k] for k in good], transform)
    return failed


def device_crops(datas: list[bytes | np.ndarray], device: Any, decoder: JpegDecoder,
                 transform: ImageTransform = DEFAULT_TRANSFORM) -> list[Any]:
    """Decode + resize + crop on ``device``: per image a uint8 ``[crop, crop, 3]`` device tensor, or
    the exception that made it fall back to the CPU path."""
    side = transform.crop
    out = torch.empty((len(datas), side, side, 3), dtype=torch.uint8, device=device)
    failed = decode_into(datas, out, list(range(len(datas))), decoder, transform)
    return [failed[k] if k in failed else out[k] for k in range(len(datas))]
