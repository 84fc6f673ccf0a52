"""The worker's preprocessing equals OpenAI CLIP's reference ``_transform`` bit for bit.

The reference is re-implemented here independently, with plain PIL + numpy and integer arithmetic
(no torch, no code shared with worker/preprocess.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embedjob.worker.datapath.decode import load_image, open_image
from embedjob.worker.datapath.preprocess import PREPROCESSING_ID, normalize, preprocess, reference_crop
from tests import shards

REF_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
REF_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
N_PX = 224


def _decode(data: bytes) -> Image.Image:
    """What the decode workers do before preprocessing: parse the header, check the size, load."""
    return load_image(open_image(data, max_pixels=10**8))


def _round_half_even_of_half(d: int) -> int:
    """round(d / 2) with Python's (banker's) rounding, in integers."""
    q, r = divmod(d, 2)
    if r == 0:
        return q
    return q if q % 2 == 0 else q + 1


def clip_reference(img: Image.Image) -> np.ndarray:
    """Resize(224, BICUBIC) -> CenterCrop(224) -> convert("RGB") -> ToTensor -> Normalize."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = (N_PX * long) // short
    new_w, new_h = (N_PX, new_long) if w <= h else (new_long, N_PX)
    resized = img.resize((new_w, new_h), Image.BICUBIC)
    # Cropping commutes with a per-pixel mode conversion, so convert first and crop in numpy.
    arr = np.asarray(resized.convert("RGB"))
    top, left = _round_half_even_of_half(new_h - N_PX), _round_half_even_of_half(new_w - N_PX)
    arr = arr[top : top + N_PX, left : left + N_PX, :]
    x = arr.astype(np.float32) / np.float32(255.0)
    x = (x - REF_MEAN) / REF_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _ours(img: Image.Image) -> np.ndarray:
    out = preprocess(img)
    assert out.dtype.is_floating_point and tuple(out.shape) == (3, N_PX, N_PX)
    return out.numpy()


REFERENCE_CASES = sorted(set(shards.varied_images()) - shards.NON_REFERENCE)


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_decoded_inputs_match_reference_bit_for_bit(name):
    _, data = shards.varied_images()[name]
    ours = _ours(_decode(data))
    ref = clip_reference(Image.open(io.BytesIO(data)))
    assert ours.dtype == np.float32 and ref.dtype == np.float32
    assert np.array_equal(ours, ref), f"{name}: max abs diff {np.abs(ours - ref).max()}"


def _in_memory_cases() -> dict[str, Image.Image]:
    base = shards.rgb(263, 241, seed=40)
    pa = shards.palette_with_transparency(250, 300, seed=41).convert("PA")
    return {
        # crop offsets on both sides of a .5 (torchvision rounds half to even)
        "w225": shards.rgb(225, 224, 42),
        "w227": shards.rgb(227, 224, 43),
        "w229": shards.rgb(229, 224, 44),
        "h231": shards.rgb(224, 231, 45),
        "exact": shards.rgb(224, 224, 46),
        "ycbcr": base.convert("YCbCr"),
        "hsv": base.convert("HSV"),
        "rgbx": base.convert("RGBX"),
        "cmyk": base.convert("CMYK"),
        "pa": pa,
        "i_8bit_range": shards.grey(260, 230, 47).convert("I"),
        "f_over_one": Image.fromarray(shards.pattern(240, 250, 48, channels=1)[..., 0].astype(np.float32) * 2, "F"),
    }


@pytest.mark.parametrize("name", sorted(_in_memory_cases()))
def test_more_modes_and_crop_offsets_match_reference(name):
    img = _in_memory_cases()[name]
    assert np.array_equal(_ours(img), clip_reference(img)), name


def test_rgba_alpha_is_dropped_not_composited():
    """The reference drops alpha (HF's processor composites on white instead)."""
    rgba = shards.rgba(224, 224, seed=50)
    arr = np.array(rgba)
    arr[..., 3] = 0  # fully transparent
    rgba = Image.fromarray(arr, "RGBA")
    assert np.array_equal(_ours(rgba), clip_reference(Image.fromarray(arr[..., :3], "RGB")))


def test_sixteen_bit_is_scaled_not_clipped():
    """A 16-bit grey image whose values are exactly 257 x an 8-bit image embeds as that 8-bit image
    (the reference would clip nearly every pixel to white)."""
    data = shards.encode(shards.sixteen_bit(300, 240, seed=21), "PNG")
    img = _decode(data)
    assert img.mode.startswith("I;16")
    assert np.array_equal(_ours(img), clip_reference(shards.grey(300, 240, seed=21)))


def test_float_image_in_unit_range_is_scaled():
    data = shards.encode(shards.float_image(240, 300, seed=22), "TIFF")
    img = _decode(data)
    assert img.mode == "F"
    assert np.array_equal(_ours(img), clip_reference(shards.grey(240, 300, seed=22)))


@pytest.mark.parametrize(
    "img",
    [
        Image.fromarray((shards.pattern(250, 230, 60, channels=1)[..., 0].astype(np.int32) * 200), "I"),
        Image.new("La", (240, 260)),
        Image.new("LAB", (260, 240), (50, 10, -20)),
        Image.new("I;16B", (230, 250), 40000),
    ],
    ids=["i_16bit_range", "la_premultiplied", "lab", "i16_big_endian"],
)
def test_modes_the_reference_cannot_handle_still_give_a_tensor(img):
    out = _ours(img)
    assert out.dtype == np.float32 and out.shape == (3, N_PX, N_PX)
    assert np.isfinite(out).all()
    # Not the clipped-to-white garbage: the image is not uniformly at the top of the range.
    assert not np.allclose(out, (1 - REF_MEAN[:, None, None]) / REF_STD[:, None, None])


def test_batch_normalize_equals_single_image_transform():
    imgs = [shards.rgb(300 + i, 250, seed=70 + i) for i in range(3)]
    crops = np.stack([reference_crop(i) for i in imgs])
    batch = normalize(crops).numpy()
    for i, img in enumerate(imgs):
        assert np.array_equal(batch[i], clip_reference(img))


def test_preprocessing_has_an_id():
    assert PREPROCESSING_ID == "openai-clip-reference-v1"
