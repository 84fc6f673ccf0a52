"""Which pixels a checkpoint wants: :class:`ImageTransform`, taken from its own processor config.

Two resize rules cover the families embedjob loads:

- ``clip`` (OpenAI and LAION CLIP, every size): OpenAI's reference ``_transform``: Pillow bicubic resize
  of the short side to ``resize`` (torchvision's rounding), center crop ``crop`` (torchvision's offset
  rounding), then RGB (:mod:`embedjob.worker.datapath.preprocess`, bit for bit);
- ``squash`` (SigLIP and fixed-resolution SigLIP 2): Hugging Face's PIL image processor: RGB first (an
  alpha channel composited on white), then Pillow bicubic resize to ``crop`` x ``crop`` whatever the
  aspect ratio, no crop.

Then ``(u8 / 255 - mean) / std`` in float32 with the checkpoint's mean and std, on the device
(:func:`normalize`). Torch-free at import (``normalize`` imports torch when called): the decode
processes receive a transform as a small JSON dict in each chunk's header. Part of the model, not of
the data path: it says what the checkpoint wants; the data path (decode, crop) carries it out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_ID = "openai-clip-reference-v1"  # the default transform's id, unchanged since the first manifests
SQUASH_ID = "hf-pil-squash-v1"
RULES = ("clip", "squash")
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as processor configs spell it


class TransformError(ValueError):
    """A processor config embedjob cannot reproduce exactly."""


@dataclass(frozen=True)
class ImageTransform:
    rule: str = "clip"  # RULES
    resize: int = 224  # clip: the short side after the resize; squash: the side (= crop)
    crop: int = 224  # the side of the square the model sees
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise TransformError(f"unknown resize rule {self.rule!r}")
        if self.crop < 1 or self.resize < self.crop:
            raise TransformError(f"resize {self.resize} must be at least the crop {self.crop}")

    @property
    def id(self) -> str:
        """What a manifest records as ``preprocessing``: OpenAI's 224 transform keeps its first id;
        any other size, rule or normalisation says what it is."""
        if self == DEFAULT_TRANSFORM:
            return CLIP_ID
        base = CLIP_ID if self.rule == "clip" else SQUASH_ID
        size = f"{self.resize}-{self.crop}" if self.resize != self.crop else str(self.crop)
        norm = "" if (self.mean, self.std) == (OPENAI_MEAN, OPENAI_STD) else "-norm" + hashlib.sha256(
            json.dumps([self.mean, self.std]).encode()).hexdigest()[:8]
        return f"{base}@{size}{norm}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ImageTransform:
        if not d:
            return DEFAULT_TRANSFORM
        return cls(rule=d["rule"], resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]))


DEFAULT_TRANSFORM = ImageTransform()


def _side(value: Any, what: str) -> int:
    """A square side from a processor config's ``size``/``crop_size`` (an int, or a dict)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value and len(value) == 1:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value and value["height"] == value["width"]:
            return int(value["height"])
    raise TransformError(f"{what} {value!r} is not a square side embedjob reproduces")


def transform_from_config(family: str, processor: dict[str, Any] | None, image_size: int) -> ImageTransform:
    """The transform of a checkpoint of ``family`` (``clip`` | ``siglip``) from its
    ``preprocessor_config.json`` (``processor``; None: the family's defaults at the vision config's
    ``image_size``). Raises :class:`TransformError` for settings it cannot reproduce exactly."""
    if family not in ("clip", "siglip"):
        raise TransformError(f"no image transform for family {family!r}")
    p = dict(processor or {})
    if family == "clip":
        defaults = {"do_resize": True, "do_center_crop": True, "size": {"shortest_edge": image_size},
                    "crop_size": {"height": image_size, "width": image_size}, "image_mean": list(OPENAI_MEAN),
                    "image_std": list(OPENAI_STD)}
    else:
        defaults = {"do_resize": True, "do_center_crop": False, "size": {"height": image_size, "width": image_size},
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    defaults |= {"resample": BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "do_convert_rgb": True}
    c = {**defaults, **{k: v for k, v in p.items() if v is not None}}
    if c["resample"] != BICUBIC:
        raise TransformError(f"resample {c['resample']!r} (only bicubic, {BICUBIC}, is reproduced)")
    if not (c["do_resize"] and c["do_rescale"] and c["do_normalize"]) or abs(c["rescale_factor"] - 1 / 255) > 1e-12:
        raise TransformError("the processor must resize, rescale by 1/255 and normalize")
    mean, std = tuple(float(x) for x in c["image_mean"]), tuple(float(x) for x in c["image_std"])
    if len(mean) != 3 or len(std) != 3:
        raise TransformError(f"image_mean/image_std must have 3 values, got {mean}, {std}")
    size = c["size"]
    if c["do_center_crop"]:
        if not (isinstance(size, dict) and set(size) == {"shortest_edge"}) and not isinstance(size, int):
            raise TransformError(f"a center crop after a resize of {size!r} (only shortest_edge is reproduced)")
        crop = _side(c.get("crop_size") or size, "crop_size")
        transform = ImageTransform("clip", _side(size, "size"), crop, mean, std)
    else:
        if not (isinstance(size, dict) and set(size) == {"height", "width"}):
            raise TransformError(f"a resize without a crop to {size!r} (only height = width is reproduced)")
        side = _side(size, "size")
        transform = ImageTransform("squash", side, side, mean, std)
    if transform.crop != image_size:
        raise TransformError(f"the processor makes {transform.crop} px images, the vision tower takes {image_size}")
    return transform


def normalize(crops: Any, contiguous: bool = True, mean: tuple[float, ...] = OPENAI_MEAN,
              std: tuple[float, ...] = OPENAI_STD) -> Any:
    """ToTensor + Normalize for a batch: uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]``, on the
    tensor's own device (the engine calls it on the GPU). Each element is ``(u8 / 255 - mean) / std``
    in float32, as in the reference; the arithmetic runs on the channel-last layout (several times
    faster than on the permuted view) and gives the same numbers. ``contiguous=False`` returns the
    channel-last view, which a convolution takes as it is."""
    import torch

    t = torch.as_tensor(crops)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    key = (t.device.type, t.device.index, tuple(mean), tuple(std))
    constants = _constants.get(key)
    if constants is None:
        constants = _constants[key] = (torch.tensor(mean, dtype=torch.float32, device=t.device),
                                       torch.tensor(std, dtype=torch.float32, device=t.device))
    x = t.to(torch.float32).div_(255).sub_(constants[0]).div_(constants[1]).permute(0, 3, 1, 2)
    return x.contiguous() if contiguous else x


_constants: dict[tuple, tuple] = {}
