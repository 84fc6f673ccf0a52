"""The fast path's deviation from the exact one, on the same images: PSNR and mean absolute
difference of the 224x224 crops, and the cosine between their embeddings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from embedjob.contract import EmbedOptions


def fast_crops(datas: list[bytes], device: Any, max_pixels: int) -> tuple[list[np.ndarray], str]:
    """The fast path's crops as the worker makes them on ``device``: nvJPEG + resize on the device on
    CUDA (the CPU path for what it refuses), DCT-domain downscale + exact resize on the CPU."""
    from embedjob.worker.datapath.crop import Crop, prepare_image

    out: list[Any] = [None] * len(datas)
    path = "cpu-draft"
    if device.type == "cuda":
        from embedjob.worker.datapath.gpu_decode import device_crops, nvjpeg_decoder

        path = "device-nvjpeg"
        for i, crop in enumerate(device_crops(datas, device, nvjpeg_decoder())):
            if not isinstance(crop, BaseException):
                out[i] = crop.cpu().numpy()
    for i, d in enumerate(datas):
        if out[i] is None:
            item = prepare_image(d, max_pixels, "fast")
            assert isinstance(item, Crop), item
            out[i] = item.pixels
    return out, path


def measure_deviation(datas: list[bytes], device: Any, model_dir: str, precision: str) -> dict[str, Any]:
    """Fast against exact on the same images: PSNR and mean absolute difference of the 224x224 crops,
    and the cosine between the embeddings of the two crops."""
    from embedjob.worker.datapath.crop import Crop, prepare_image
    from embedjob.worker.model.load import load_embedder

    max_pixels = EmbedOptions().max_image_pixels
    exact = []
    for d in datas:
        item = prepare_image(d, max_pixels, "exact")
        assert isinstance(item, Crop), item
        exact.append(item.pixels)
    fast, path = fast_crops(datas, device, max_pixels)
    psnr, mad = [], []
    for a, b in zip(exact, fast, strict=True):
        diff = a.astype(np.float64) - b.astype(np.float64)
        mse = float(np.mean(diff**2))
        psnr.append(math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))
        mad.append(float(np.mean(np.abs(diff))))
    embedder = load_embedder(model_dir, device=str(device), precision=precision)
    ea, eb = embedder.embed_uint8(np.stack(exact)), embedder.embed_uint8(np.stack(fast))
    cos = (ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
    finite = [p for p in psnr if math.isfinite(p)]
    return {
        "images": len(datas),
        "identical_crops": sum(1 for p in psnr if not math.isfinite(p)),
        "psnr_db_min": round(min(finite), 2) if finite else None,
        "psnr_db_mean": round(float(np.mean(finite)), 2) if finite else None,
        "mean_abs_diff": round(float(np.mean(mad)), 4),
        "mean_abs_diff_max": round(float(np.max(mad)), 4),
        "cosine_min": round(float(cos.min()), 6),
        "cosine_mean": round(float(cos.mean()), 6),
        "model": Path(model_dir).name,
        "precision": embedder.precision,
        "fast_path": path,
    }
