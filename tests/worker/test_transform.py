"""The model's own preprocessing (embedjob.worker.model.transform) from its processor config, against
each family's reference: OpenAI's transform at 336 px and Hugging Face's PIL SigLIP image processor, bit for
bit on real and hostile images (every varied image the reference itself handles)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embedjob.worker.datapath.crop import Crop, prepare_image
from embedjob.worker.datapath.preprocess import normalize
from embedjob.worker.model.random_weights import clip_processor_config, siglip_processor_config
from embedjob.worker.model.transform import (
    DEFAULT_TRANSFORM,
    ImageTransform,
    TransformError,
    transform_from_config,
)
from tests import shards

SIGLIP = transform_from_config("siglip", siglip_processor_config(224), 224)
CLIP_336 = transform_from_config("clip", clip_processor_config(336), 336)
IMAGES = sorted(set(shards.varied_images()) - shards.NON_REFERENCE)


def test_transforms_come_from_the_processor_config():
    assert transform_from_config("clip", clip_processor_config(224), 224) == DEFAULT_TRANSFORM
    assert transform_from_config("clip", None, 224).id == "openai-clip-reference-v1"  # no config: the family's
    assert (CLIP_336.rule, CLIP_336.resize, CLIP_336.crop, CLIP_336.id) == ("clip", 336, 336,
                                                                            "openai-clip-reference-v1@336")
    assert (SIGLIP.rule, SIGLIP.crop, SIGLIP.mean, SIGLIP.std) == ("squash", 224, (0.5,) * 3, (0.5,) * 3)
    assert SIGLIP.id.startswith("hf-pil-squash-v1@224-norm") and ImageTransform.from_dict(SIGLIP.to_dict()) == SIGLIP
    hf_style = {**clip_processor_config(336), "size": {"shortest_edge": 336},
                "crop_size": {"height": 336, "width": 336}}
    assert transform_from_config("clip", hf_style, 336) == CLIP_336
    for bad, why in [({**siglip_processor_config(224), "resample": 2}, "only bicubic"),
                     ({**siglip_processor_config(224), "size": {"height": 224, "width": 256}}, "not a square side"),
                     (siglip_processor_config(384), "the vision tower takes 224")]:
        with pytest.raises(TransformError, match=why):
            transform_from_config("siglip", bad, 224)


def _ours(data: bytes, transform: ImageTransform) -> np.ndarray:
    item = prepare_image(data, 10**9, "exact", False, transform)
    assert isinstance(item, Crop), item
    return normalize(item.pixels[None], mean=transform.mean, std=transform.std)[0].numpy()


@pytest.mark.parametrize("name", IMAGES)
def test_siglip_pixels_match_the_hf_pil_processor_bit_for_bit(name):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    data = shards.varied_images()[name][1]
    ref = SiglipImageProcessorPil(**siglip_processor_config(224))(images=Image.open(io.BytesIO(data)),
                                                                  return_tensors="np")["pixel_values"][0]
    ours = _ours(data, SIGLIP)
    assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape == (3, 224, 224)
    assert np.array_equal(ours, ref), f"max |diff| {np.abs(ours - ref).max()}"


def _openai_reference(img: Image.Image, n: int) -> np.ndarray:
    """OpenAI's _transform at n px: Resize(n, BICUBIC), CenterCrop(n), RGB, ToTensor, Normalize."""
    w, h = img.size
    new = (n, n * h // w) if w <= h else (n * w // h, n)
    arr = np.asarray(img.resize(new, Image.BICUBIC).convert("RGB"))
    top, left = int(round((new[1] - n) / 2.0)), int(round((new[0] - n) / 2.0))
    x = arr[top:top + n, left:left + n].astype(np.float32) / np.float32(255.0)
    x = (x - np.array(CLIP_336.mean, np.float32)) / np.array(CLIP_336.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@pytest.mark.parametrize("name", ["jpg_landscape", "jpg_portrait_odd", "png_rgb", "wide", "tall", "small"])
def test_clip_336_pixels_match_the_openai_transform_bit_for_bit(name):
    data = shards.varied_images()[name][1]
    assert np.array_equal(_ours(data, CLIP_336), _openai_reference(Image.open(io.BytesIO(data)), 336))
