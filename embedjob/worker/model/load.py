"""Which checkpoint, loading it, and the per-process cache of loaded models.

:func:`load_embedder` loads the vision tower of a CLIP checkpoint (``CLIPVisionModelWithProjection``) or of
a SigLIP one (``SiglipVisionModel``, its pooled output), with the checkpoint's own preprocessing
(:func:`image_transform`); for a job with text outputs, also the same checkpoint's text tower
(``CLIPTextModelWithProjection`` with OpenAI CLIP's tokenizer, or ``SiglipTextModel`` with the checkpoint's
own ``SiglipTokenizer``: :func:`_load_text`). Either from a Hugging Face id (cached under ``model_dir``) or a local
folder. A full ``CLIPModel`` checkpoint
— the hub layout of ``openai/clip-vit-large-patch14`` — loads as is: its vision config and
projection size are taken from the checkpoint's ``config.json``, the text weights are skipped, and a
missing or mis-shaped vision weight is an error (never a silently random-initialised layer).
Checkpoints are only ever read as safetensors with the built-in CLIP and SigLIP classes: ``trust_remote_code``
is never passed, so no code shipped with a checkpoint runs.

A loaded :class:`~embedjob.worker.model.embedder.Embedder` is cached, once per process, and reused
for every shard. The cache holds ONE model: loading another (a job with a different model, dtype or
compile mode) first drops the previous one and frees its memory (``gc`` and, on CUDA, the caching
allocator's blocks), so a worker that serves many jobs holds one model, not every model it ever
loaded (a shard still running with the old one keeps it alive until it ends). Hub kernels are never
fetched (``use_kernels=False``; ``USE_HUB_KERNELS=0`` in the worker's environment).
:func:`load_or_reuse` says whether a call really loaded (the worker times only those). Attention
runs through PyTorch's scaled-dot-product attention (``attn_implementation="sdpa"``: flash /
memory-efficient kernels on CUDA).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedjob import settings
from embedjob.spec import COMPILE_MODES
from embedjob.worker.model import ModelLoadError
from embedjob.worker.model.embedder import Embedder
from embedjob.worker.model.provenance import describe_source
from embedjob.worker.model.resolve import ModelUnavailable, resolve_model
from embedjob.worker.model.text import TextEmbedder
from embedjob.worker.model.tokenizer import CONTEXT_LENGTH, clip_tokenizer
from embedjob.worker.model.torch_env import PRECISION_DTYPES, configure_cpu_threads, resolve_device, torch
from embedjob.worker.model.transform import ImageTransform, TransformError, transform_from_config

log = logging.getLogger(__name__)

# model_type -> family. A family is a vision class, its output and its transform's defaults.
FAMILIES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
PROCESSOR_CONFIG = "preprocessor_config.json"
ATTENTION = "sdpa"

__all__ = ["ModelLoadError", "ModelRef", "clear_cache", "default_model_dir", "load_embedder", "load_or_reuse",
           "resolve_dtype", "vision_config"]


@dataclass(frozen=True)
class ModelRef:
    """Which checkpoint: a hub ``name`` at ``revision``, or a local ``path`` (which wins)."""

    name: str
    revision: str | None = None
    path: str | None = None

    @classmethod
    def of(cls, model: Any) -> ModelRef:
        """From a ModelSpec, a dict with name/revision/path, or a plain id/path string."""
        if isinstance(model, ModelRef):
            return model
        if isinstance(model, str):
            return cls(name=model, path=model if os.path.isdir(model) else None)
        get = model.get if isinstance(model, dict) else (lambda k, d=None: getattr(model, k, d))
        name, path = get("name"), get("path")
        if not name and not path:
            raise ModelLoadError("model needs a name (Hugging Face id) or a path")
        return cls(name=name or str(path), revision=get("revision"), path=path or None)

    @property
    def source(self) -> str:
        return self.path or self.name


def default_model_dir() -> str:
    return settings.load().model_dir


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA, fp32 on CPU. fp32/fp16/bf16: as asked."""
    if precision in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return PRECISION_DTYPES[precision]
    except KeyError:
        raise ModelLoadError(f"unsupported precision {precision!r} (use auto, fp32, fp16 or bf16)") from None


_cache: dict[tuple, Embedder] = {}
_cache_lock = threading.Lock()


def _config_dict(ref: ModelRef, cache_dir: str, local_only: bool) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (no model class is chosen from it yet)."""
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(ref.source, revision=ref.revision, cache_dir=cache_dir,
                                                          local_files_only=local_only)
    except Exception as e:
        raise ModelLoadError(f"cannot read the model config of {ref.source!r}: {type(e).__name__}: {e}") from e
    return config_dict


def vision_config(ref: ModelRef, cache_dir: str, local_only: bool = False) -> Any:
    """The vision config from the checkpoint's config.json, with the projection size of the full
    model (a CLIPModel's vision_config does not carry it). Only the model types of FAMILIES are
    accepted. ``local_only``: never ask the hub (a folder, or a model already in the cache)."""
    from transformers import CLIPConfig, CLIPVisionConfig, SiglipConfig, SiglipVisionConfig

    config_dict = _config_dict(ref, cache_dir, local_only)
    model_type = config_dict.get("model_type")
    if model_type == "clip":
        full = CLIPConfig.from_dict(config_dict)
        vision = full.vision_config
        vision.projection_dim = full.projection_dim
        return vision
    if model_type == "clip_vision_model":
        return CLIPVisionConfig.from_dict(config_dict)
    if model_type == "siglip":
        return SiglipConfig.from_dict(config_dict).vision_config
    if model_type == "siglip_vision_model":
        return SiglipVisionConfig.from_dict(config_dict)
    if model_type == "siglip2":
        raise ModelLoadError(
            f"spec.model {ref.source!r} is a SigLIP 2 NaFlex checkpoint (model_type 'siglip2': variable "
            "resolution, patchified input), which embedjob does not embed; the fixed-resolution SigLIP 2 "
            "checkpoints (model_type 'siglip', e.g. google/siglip2-base-patch16-224) are supported")
    raise ModelLoadError(
        f"spec.model {ref.source!r} has model_type {model_type!r}; embedjob loads only CLIP and SigLIP "
        f"checkpoints ({', '.join(SUPPORTED_MODEL_TYPES)}) with the built-in classes and never runs code from a "
        "checkpoint (trust_remote_code is never enabled)"
    )


def image_transform(ref: ModelRef, cache_dir: str, config: Any, local_only: bool = False) -> ImageTransform:
    """The checkpoint's own preprocessing (embedjob.worker.model.transform) from its
    preprocessor_config.json, or its family's defaults at the vision tower's image size when it has none.
    Raises :class:`ModelLoadError` naming spec.model for settings that cannot be reproduced exactly."""
    family = FAMILIES.get(config.model_type, "clip")
    file: Path | None = Path(ref.path) / PROCESSOR_CONFIG if ref.path else None
    if file is None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            file = Path(hf_hub_download(ref.name, PROCESSOR_CONFIG, revision=ref.revision, cache_dir=cache_dir,
                                        local_files_only=local_only))
        except (EntryNotFoundError, LocalEntryNotFoundError):  # none (or not fetched): the family's defaults
            file = None
    try:
        processor = json.loads(file.read_text()) if file is not None and file.is_file() else None
        return transform_from_config(family, processor, int(config.image_size))
    except (TransformError, ValueError) as e:
        raise ModelLoadError(f"spec.model {ref.source!r}: {PROCESSOR_CONFIG}: {e}") from e


def _load_module(ref: ModelRef, cache_dir: str, dtype: torch.dtype, local_only: bool = False) -> torch.nn.Module:
    from transformers import CLIPVisionModelWithProjection, SiglipVisionModel
    from transformers.utils import logging as hf_logging

    # The loading report lists every skipped text-tower weight (we check the info ourselves), and
    # the full config warns about text-tower settings we never use.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = vision_config(ref, cache_dir, local_only)
        cls = SiglipVisionModel if config.model_type == "siglip_vision_model" else CLIPVisionModelWithProjection
        module, info = cls.from_pretrained(
            ref.source,
            config=config,
            revision=ref.revision,
            cache_dir=cache_dir,
            local_files_only=local_only,
            use_safetensors=True,
            dtype=dtype,
            attn_implementation=ATTENTION,
            output_loading_info=True,
            use_kernels=False,  # never code from the hub (transformers 5 hub kernels)
        )
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load the vision tower from {ref.source!r}: {type(e).__name__}: {e}") from e
    finally:
        hf_logging.set_verbosity(previous)
    _check_complete(info, ref.source, "vision tower")
    return module


def _check_complete(info: dict, source: str, what: str) -> None:
    """A checkpoint loaded with ``output_loading_info``: every weight of the tower was in it."""
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "mismatched_keys", "error_msgs")}
    if any(problems.values()):
        raise ModelLoadError(f"checkpoint {source!r} does not hold a complete {what}: {problems}")


def load_or_reuse(
    model: Any,
    device: str = "auto",
    precision: str = "auto",
    model_dir: str | None = None,
    compile: str = "none",  # noqa: A002 - the spec's name (spec.inference.compile)
    text: bool = False,
) -> tuple[Embedder, bool]:
    """Load (or reuse, once per process) the CLIP image embedder for ``model`` — a ModelSpec, a dict
    with ``name``/``revision``/``path``, or an id/path string.

    ``device``: auto (CUDA if available, else CPU) | cpu | cuda[:N]. ``precision``: auto (fp16 on
    CUDA, fp32 on CPU) | fp32 | fp16 | bf16. ``model_dir``: the download cache (default
    ``$EMBEDJOB_MODEL_DIR`` or ``~/.cache/embedjob/models``). ``compile``: one of COMPILE_MODES
    (see :meth:`Embedder.enable_compile`). ``text``: the same checkpoint's text tower too, as
    ``embedder.text`` (loaded once, beside a cached image embedder). Returns ``(embedder, cached)``:
    ``cached`` is False when this call loaded something. Raises :class:`ModelLoadError`."""
    ref = ModelRef.of(model)
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    cache_dir = model_dir or default_model_dir()
    if compile not in COMPILE_MODES:
        raise ModelLoadError(f"unsupported compile mode {compile!r} (use {', '.join(COMPILE_MODES)})")
    key = (ref, str(dev), dtype, cache_dir, compile)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            if text and cached.text is None:
                cached.text = _load_text(ref, cache_dir, cached, _where(ref, cache_dir).local_only)
                return cached, False
            return cached, True
        _evict()  # one model per process: the previous one is freed before the next is loaded
        if dev.type == "cpu":
            configure_cpu_threads()
        where = _where(ref, cache_dir)
        module = _load_module(ref, cache_dir, dtype, where.local_only).to(dev).eval()
        module.requires_grad_(False)
        transform = image_transform(ref, cache_dir, module.config, where.local_only)
        siglip = module.config.model_type == "siglip_vision_model"

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            out = module(pixel_values=pixels)
            # SigLIP's image embedding is its vision tower's pooled output (SiglipModel.get_image_features).
            return out.pooler_output if siglip else out.image_embeds

        embedder = Embedder(
            forward,
            model_id=ref.name,
            revision=ref.revision,
            dim=int(module.config.hidden_size if siglip else module.config.projection_dim),
            device=dev,
            dtype=dtype,
            source=ref.source,
            module=module,
        )
        embedder.transform = transform
        embedder.provenance = {
            **describe_source(None if ref.path else ref.name, None if ref.path else ref.revision, ref.path,
                              module.config, embedder.dim),
            "imageSize": transform.crop, "preprocessing": transform.id}
        if dev.type == "cpu" and dtype != torch.float32:
            _check_runs(embedder, precision)
        embedder.enable_compile(compile)
        if text:
            embedder.text = _load_text(ref, cache_dir, embedder, where.local_only)
        _cache[key] = embedder
        return embedder, False


def _where(ref: ModelRef, cache_dir: str) -> Any:
    """A cached model loads from the cache alone; an unreachable hub fails at once, said plainly."""
    try:
        return resolve_model({"name": None if ref.path else ref.name, "revision": ref.revision, "path": ref.path},
                             cache_dir)
    except ModelUnavailable as e:
        raise ModelLoadError(str(e)) from e


def _load_text(ref: ModelRef, cache_dir: str, image: Embedder, local_only: bool) -> TextEmbedder:
    """The text tower of ``ref`` (a full CLIP or SigLIP checkpoint) with its family's tokenizer, on the
    image embedder's device and in its precision, sharing its lock. Refused, naming spec.model, when the
    checkpoint has no text tower, or one that does not fit its tokenizer or the image rows."""
    config_dict = _config_dict(ref, cache_dir, local_only)
    model_type = config_dict.get("model_type")
    if model_type == "clip":
        return _load_clip_text(ref, cache_dir, image, local_only, config_dict)
    if model_type == "siglip":
        return _load_siglip_text(ref, cache_dir, image, local_only, config_dict)
    raise ModelLoadError(f"spec.outputs: text needs a full CLIP or SigLIP checkpoint (model_type 'clip' or 'siglip', "
                         f"text tower included); spec.model {ref.source!r} has model_type {model_type!r}")


def _from_pretrained(cls: Any, ref: ModelRef, cache_dir: str, config: Any, dtype: torch.dtype, local_only: bool,
                     what: str) -> torch.nn.Module:
    """One tower of a checkpoint, safetensors only, no hub code; every weight of it present."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        module, info = cls.from_pretrained(
            ref.source, config=config, revision=ref.revision, cache_dir=cache_dir, local_files_only=local_only,
            use_safetensors=True, dtype=dtype, attn_implementation=ATTENTION, output_loading_info=True,
            use_kernels=False)
    except Exception as e:
        raise ModelLoadError(f"cannot load the {what} from {ref.source!r}: {type(e).__name__}: {e}") from e
    finally:
        hf_logging.set_verbosity(previous)
    _check_complete(info, ref.source, what)
    return module


def _load_clip_text(ref: ModelRef, cache_dir: str, image: Embedder, local_only: bool,
                    config_dict: dict) -> TextEmbedder:
    """CLIPTextModelWithProjection with OpenAI CLIP's tokenizer (the vocabulary and context must fit it)."""
    from transformers import CLIPConfig, CLIPTextModelWithProjection

    full = CLIPConfig.from_dict(config_dict)
    config = full.text_config
    config.projection_dim = full.projection_dim
    tokenizer = clip_tokenizer(CONTEXT_LENGTH)
    if config.vocab_size < tokenizer.vocab_size or config.max_position_embeddings < CONTEXT_LENGTH:
        raise ModelLoadError(
            f"spec.outputs: text: the text tower of spec.model {ref.source!r} (vocabulary {config.vocab_size}, "
            f"{config.max_position_embeddings} positions) was not trained with OpenAI CLIP's tokenizer "
            f"({tokenizer.vocab_size} ids, context {CONTEXT_LENGTH})")
    module = _from_pretrained(CLIPTextModelWithProjection, ref, cache_dir, config, image.dtype, local_only,
                              "CLIP text tower")
    module = module.to(image.device).eval()
    module.requires_grad_(False)
    if int(config.projection_dim) != image.dim:
        raise ModelLoadError(f"spec.model {ref.source!r}: text projection {config.projection_dim} != image {image.dim}")

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return module(input_ids=ids).text_embeds

    return TextEmbedder(forward, tokenizer=tokenizer, dim=image.dim, device=image.device, lock=image.lock)


def _checkpoint_file(ref: ModelRef, cache_dir: str, name: str, local_only: bool) -> Path | None:
    """A small file of the checkpoint (a folder's, or the hub's / the cache's), or None without one."""
    if ref.path:
        file = Path(ref.path) / name
        return file if file.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(ref.name, name, revision=ref.revision, cache_dir=cache_dir,
                                    local_files_only=local_only))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    except Exception as e:
        raise ModelLoadError(f"spec.model {ref.source!r}: cannot read {name}: {type(e).__name__}: {e}") from e


def _load_siglip_text(ref: ModelRef, cache_dir: str, image: Embedder, local_only: bool,
                      config_dict: dict) -> TextEmbedder:
    """SiglipTextModel (its pooled output: SiglipModel.get_text_features) with the checkpoint's own
    SiglipTokenizer (spiece.model), every caption padded to max_position_embeddings. A SigLIP 2
    checkpoint (Gemma tokenizer) or one without spiece.model is refused naming spec.model."""
    from transformers import SiglipConfig, SiglipTextModel

    from embedjob.worker.model.siglip_tokenizer import VOCAB_FILE, SiglipCaptionTokenizer

    config = SiglipConfig.from_dict(config_dict).text_config
    tok_file = _checkpoint_file(ref, cache_dir, "tokenizer_config.json", local_only)
    try:
        tok_class = json.loads(tok_file.read_text()).get("tokenizer_class") if tok_file else None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"spec.model {ref.source!r}: tokenizer_config.json: {e}") from e
    if tok_class not in (None, "SiglipTokenizer") or _checkpoint_file(ref, cache_dir, VOCAB_FILE, local_only) is None:
        which = f"tokenizer_class {tok_class!r}" if tok_class not in (None, "SiglipTokenizer") else f"no {VOCAB_FILE}"
        raise ModelLoadError(
            f"spec.outputs: text: spec.model {ref.source!r} is a SigLIP checkpoint without SigLIP's SentencePiece "
            f"tokenizer ({which}); embedjob embeds SigLIP captions only with SiglipTokenizer and the checkpoint's "
            f"{VOCAB_FILE} (SigLIP 2 checkpoints use the Gemma tokenizer, which is not supported for text outputs; "
            f"a model cache filled without the tokenizer files needs `embedjob model fetch` again)")
    context = int(config.max_position_embeddings)
    try:
        tokenizer = SiglipCaptionTokenizer.from_checkpoint(ref.source, context, revision=ref.revision,
                                                           cache_dir=cache_dir, local_only=local_only)
    except Exception as e:
        raise ModelLoadError(f"spec.model {ref.source!r}: cannot build its SiglipTokenizer: "
                             f"{type(e).__name__}: {e}") from e
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"spec.outputs: text: spec.model {ref.source!r}: {VOCAB_FILE} has {tokenizer.vocab_size} pieces, the "
            f"text tower's vocabulary {config.vocab_size}")
    width = int(getattr(config, "projection_size", None) or config.hidden_size)
    if width != image.dim:
        raise ModelLoadError(f"spec.model {ref.source!r}: SigLIP text head {width} != image {image.dim}")
    module = _from_pretrained(SiglipTextModel, ref, cache_dir, config, image.dtype, local_only, "SigLIP text tower")
    module = module.to(image.device).eval()
    module.requires_grad_(False)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        # No attention mask: SigLIP was trained on max_length-padded ids without one (as get_text_features
        # is called on the processor's output), and pools the last position.
        return module(input_ids=ids).pooler_output

    return TextEmbedder(forward, tokenizer=tokenizer, dim=image.dim, device=image.device, lock=image.lock)


def load_embedder(
    model: Any,
    device: str = "auto",
    precision: str = "auto",
    model_dir: str | None = None,
    compile: str = "none",  # noqa: A002 - the spec's name (spec.inference.compile)
) -> Embedder:
    """:func:`load_or_reuse`'s embedder: the loaded (or cached) model for ``model``."""
    return load_or_reuse(model, device, precision, model_dir, compile)[0]


def _check_runs(embedder: Embedder, precision: str) -> None:
    """Reduced precision on CPU depends on the torch build and the CPU: fail at load, clearly."""
    size = int(getattr(getattr(embedder.module, "config", None), "image_size", 224))
    try:
        embedder.embed(torch.zeros(1, 3, size, size))
    except Exception as e:
        raise ModelLoadError(f"precision {precision!r} does not run on this CPU: {type(e).__name__}: {e}") from e


def _evict() -> None:
    """Drop the cached model(s) and give their memory back (call with ``_cache_lock`` held)."""
    if not _cache:
        return
    on_cuda = any(e.device.type == "cuda" for e in _cache.values())
    _cache.clear()
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()


def clear_cache() -> None:
    """Forget loaded embedders (tests; a worker keeps its one model for its lifetime)."""
    with _cache_lock:
        _cache.clear()
