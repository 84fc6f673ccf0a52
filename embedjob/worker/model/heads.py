"""Score heads: small MLPs on the L2-normalised image embedding, run in the worker on each batch it has
just embedded (no second pass, no I/O).

The architectures are built in exactly as their authors trained them, so their published weights load
as they are:

- ``aesthetic``: the LAION improved aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor,
  ``MLP``): Linear(768,1024), Dropout(0.2), Linear(1024,128), Dropout(0.2), Linear(128,64), Dropout(0.1),
  Linear(64,16), Linear(16,1) in ``layers`` (no activation: the ReLUs are commented out in the original).
  Its ``.pth`` state dict loads with its original keys ``layers.{0,2,4,6,7}.{weight,bias}``.
- ``nsfw``: the LAION CLIP-based NSFW detector (LAION-AI/CLIP-based-NSFW-Detector, the AutoKeras model
  ``clip_autokeras_binary_nsfw`` for ViT-L/14): Keras Normalization (``(x - mean) / max(sqrt(variance),
  1e-7)``), Dense 768->64 ReLU, Dense 64->512 ReLU, Dense 512->256 ReLU, Dense 256->1 sigmoid (AutoKeras'
  dropout is the identity at inference and holds no weights). Keras weights are no torch state dict; the
  key names are those of the torch conversion published with the detector (LAION-AI/CLIP-based-NSFW-Detector
  issue 7, also what NVIDIA NeMo Curator loads), so that converted file loads as it is (a Keras kernel
  ``[in, out]`` is stored transposed, ``[out, in]``)::

      norm.mean                   [768]        Normalization layer's mean
      norm.variance               [768]        Normalization layer's variance
      linear_1.weight / .bias     [64, 768]    Dense 768->64, ReLU
      linear_2.weight / .bias     [512, 64]    Dense 64->512, ReLU
      linear_3.weight / .bias     [256, 512]   Dense 512->256, ReLU
      linear_4.weight / .bias     [1, 256]     Dense 256->1, sigmoid

Weights come from a local file or a hub repository (``name`` + ``revision`` + ``file``): safetensors, or
a ``.pth`` state dict read with ``torch.load(weights_only=True)`` (never an arbitrary pickle). The input
width is the weights' own; a head whose width is not the model's is refused naming its spec field.

Scores are computed in float32 on the CPU from the rows exactly as they are written to the ``.npy``
(rounded to the output dtype), so anyone can reproduce them from the published outputs.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from embedjob.policy import PermanentError
from embedjob.spec import SCORE_HEADS, HeadSpec, check_head_width
from embedjob.worker.model import ModelLoadError
from embedjob.worker.model.torch_env import torch

nn = torch.nn
AESTHETIC_ARCH = "laion-improved-aesthetic-predictor-v2"
NSFW_ARCH = "laion-clip-based-nsfw-detector"
KERAS_EPSILON = 1e-7


class HeadMismatch(ModelLoadError, PermanentError):
    """Weights that are not the head's architecture, or not the model's width: retrying cannot help,
    so the shard fails at once (a file that cannot be read at all is an ordinary, retried failure)."""


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's ``MLP`` (its Lightning training code left out)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class NsfwDetector(nn.Module):
    """The CLIP-based NSFW detector's Keras model, in torch (key names in the module docstring)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.norm = _KerasNormalization(input_size)
        self.linear_1 = nn.Linear(input_size, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x))


class _KerasNormalization(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("variance", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.clamp(torch.sqrt(self.variance), min=KERAS_EPSILON)


ARCHITECTURES: dict[str, tuple[str, type[nn.Module], str]] = {
    # score -> (architecture id, module, the key whose last dimension is the input width)
    "aesthetic": (AESTHETIC_ARCH, AestheticMLP, "layers.0.weight"),
    "nsfw": (NSFW_ARCH, NsfwDetector, "linear_1.weight"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors: safetensors, or a ``.pth`` state dict (``weights_only``: no pickle runs)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("is not a state dict of tensors")
    return state


def weights_file(head: HeadSpec, cache_dir: str | None) -> tuple[Path, dict[str, Any]]:
    """The head's weights file on this machine, and how the records identify it."""
    if head.path:
        return Path(head.path), {"path": str(Path(head.path).resolve())}
    from huggingface_hub import hf_hub_download

    file = head.file or "model.safetensors"
    local = hf_hub_download(head.name or "", file, revision=head.revision, cache_dir=cache_dir)
    return Path(local), {"id": head.name, "revision": head.revision, "file": file}


def load_head(score: str, head: HeadSpec, dim: int, cache_dir: str | None = None) -> ScoreHead:
    """Build ``score``'s architecture and load ``head``'s weights into it (strict: every key, every
    shape). Raises :class:`ModelLoadError` naming ``spec.scores.<score>``."""
    where = f"spec.scores.{score}"
    arch, module_type, width_key = ARCHITECTURES[score]
    try:
        path, identity = weights_file(head, cache_dir)
        state = read_state_dict(path)
    except Exception as e:  # noqa: BLE001 - any reason: the field is named
        raise ModelLoadError(f"{where}: cannot read the weights: {e}") from e
    if width_key not in state:
        raise HeadMismatch(f"{where}: {path.name} is not a {SCORE_HEADS[score]} (no {width_key!r} key; "
                             f"found {', '.join(sorted(state)[:4])}...)")
    width = int(state[width_key].shape[-1])
    try:
        check_head_width(where, width, dim)
    except ValueError as e:
        raise HeadMismatch(str(e)) from e
    module = module_type(width)
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise HeadMismatch(f"{where}: {path.name} does not fit the {SCORE_HEADS[score]}: {e}") from e
    module.eval()
    identity = {"score": score, "architecture": arch, **identity, "inputDim": width, "sha256": _sha256(path)}
    return ScoreHead(score, module, identity)


class ScoreHead:
    """One loaded head: ``score(rows)`` -> float32 ``[N]``."""

    def __init__(self, name: str, module: nn.Module, identity: dict[str, Any]) -> None:
        self.name, self.module, self.identity = name, module, identity

    def score(self, rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
        return out.reshape(-1).numpy().astype(np.float32, copy=False)


class ScoreHeads:
    """The job's heads, by score name (empty when the job asks for none)."""

    def __init__(self, heads: list[ScoreHead]) -> None:
        self.heads = heads

    def __bool__(self) -> bool:
        return bool(self.heads)

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.heads]

    def score(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {h.name: h.score(rows) for h in self.heads}

    def describe(self) -> dict[str, dict[str, Any]]:
        """What the manifest records of each head: its identity and the sha256 of its weights file."""
        return {h.name: h.identity for h in self.heads}


_cache: dict[tuple, ScoreHeads] = {}
_lock = threading.Lock()


def load_heads(scores: dict[str, Any] | None, dim: int, cache_dir: str | None = None) -> ScoreHeads:
    """The heads of a task's ``scores`` option (``{score: HeadSpec fields}``), loaded once per process."""
    specs = {k: HeadSpec(**v) for k, v in sorted((scores or {}).items()) if v}
    key = (tuple((k, tuple(sorted(vars(v).items()))) for k, v in specs.items()), dim, cache_dir)
    with _lock:
        if key not in _cache:
            _cache[key] = ScoreHeads([load_head(k, v, dim, cache_dir) for k, v in specs.items()])
        return _cache[key]
