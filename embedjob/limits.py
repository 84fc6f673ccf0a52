"""The admin's ceilings on what a job may ask for, and the model allow-list. Torch-free.

The CRD's schema bounds every field for everyone; on a shared cluster the admin narrows some of them
(chart values -> ``EMBEDJOB_MAX_*``, ``EMBEDJOB_MODEL_ALLOW_LIST``, see embedjob.settings):

===========================  ==============================  ===================================
spec field                   setting                         why
===========================  ==============================  ===================================
inference.maxImagePixels     ``EMBEDJOB_MAX_IMAGE_PIXELS``   decoded pixels per image, per decoder
inference.numThreads         ``EMBEDJOB_MAX_NUM_THREADS``    decode processes per worker (and never
                                                             more than the worker's CPUs)
retries.perShard             ``EMBEDJOB_MAX_RETRIES``        work redone for one bad shard
priority                     ``EMBEDJOB_MAX_PRIORITY``       the share of a queue other jobs lose
model.name / model.revision  ``EMBEDJOB_MODEL_ALLOW_LIST``   what the workers download and load
scores.<head>.name           ``EMBEDJOB_MODEL_ALLOW_LIST``   the same, for a score head's weights
===========================  ==============================  ===================================

The operator enforces them at admission (:func:`check_spec`: the job fails with ``InvalidSpec``
naming the field), and every worker re-validates every message's options and model against its own
settings (:func:`check_task`): a message beyond them is a hard failure with
``errorCode: OptionsNotAllowed``, whoever wrote it to the broker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from embedjob.contract import EmbedOptions
from embedjob.settings import Settings
from embedjob.spec import COMPILE_MODES, DEVICES, DTYPES, PRECISIONS, PREPROCESSINGS, JobSpec, SpecError

NOT_ALLOWED = "OptionsNotAllowed"


class LimitExceeded(SpecError):  # noqa: N818 - a spec beyond the admin's ceilings (reason InvalidSpec)
    """A spec field beyond a ceiling, or a model outside the allow-list (the operator's check)."""


class OptionsNotAllowed(SpecError):  # noqa: N818 - named after the outcome it records
    """A task message's options or model beyond this worker's ceilings."""


def model_allowed(settings: Settings, name: str, revision: str | None) -> bool:
    """Whether the hub model ``name`` at ``revision`` is on the admin's list (no list: any)."""
    if settings.model_allow_list is None:
        return True
    return any(name == n and (not r or r == (revision or "")) for n, r in settings.model_allow_list)


def _listed(settings: Settings) -> str:
    return ", ".join(f"{n}@{r}" if r else n for n, r in settings.model_allow_list or ()) or "nothing"


def _ceiling(field: str, value: int, ceiling: int, setting: str, error: type[SpecError] = LimitExceeded) -> None:
    if value > ceiling:
        raise error(field, f"must be at most {ceiling} on this cluster ({setting}), got {value}")


def check_spec(spec: JobSpec, settings: Settings) -> None:
    """The operator's admission check: raise :class:`LimitExceeded` naming the first field beyond a
    ceiling or a model outside the allow-list."""
    i = spec.inference
    _ceiling("spec.inference.maxImagePixels", i.maxImagePixels, settings.max_image_pixels,
             "EMBEDJOB_MAX_IMAGE_PIXELS")
    _ceiling("spec.inference.numThreads", i.numThreads, settings.max_num_threads, "EMBEDJOB_MAX_NUM_THREADS")
    _ceiling("spec.retries.perShard", spec.retries.perShard, settings.max_retries, "EMBEDJOB_MAX_RETRIES")
    _ceiling("spec.priority", spec.priority, settings.max_priority, "EMBEDJOB_MAX_PRIORITY")
    if not spec.model.path and not model_allowed(settings, spec.model.name, spec.model.revision):
        field = "spec.model.revision" if any(n == spec.model.name for n, _ in settings.model_allow_list or ()) \
            else "spec.model.name"
        raise LimitExceeded(field, f"{spec.model.name}@{spec.model.revision or 'main'} is not on this cluster's "
                               f"model allow-list (EMBEDJOB_MODEL_ALLOW_LIST: {_listed(settings)})")
    for head_name, head in spec.scores.heads().items():  # a score head from the hub is a download too
        if head.name and not model_allowed(settings, head.name, head.revision):
            raise LimitExceeded(f"spec.scores.{head_name}.name",
                                f"{head.name}@{head.revision or 'main'} is not on this cluster's model allow-list "
                                f"(EMBEDJOB_MODEL_ALLOW_LIST: {_listed(settings)})")


def _choice(options: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> None:
    if key in options and options[key] not in choices:
        raise OptionsNotAllowed(f"task options.{key}", f"must be one of {', '.join(choices)}, got {options[key]!r}")


def _int(options: Mapping[str, Any], key: str, lo: int, hi: int, setting: str) -> None:
    if key not in options:
        return
    v = options[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise OptionsNotAllowed(f"task options.{key}", f"must be an integer, got {v!r}")
    if v < lo or v > hi:
        raise OptionsNotAllowed(f"task options.{key}", f"must be between {lo} and {hi} on this worker ({setting}), "
                                                       f"got {v}")


def check_task(options: Any, model: Any, settings: Settings, cpus: int | None = None) -> EmbedOptions:
    """The worker's check of one message's options and model against its OWN ceilings (a message is
    not trusted because it came through Redis). Returns the options; raises :class:`OptionsNotAllowed`."""
    if not isinstance(options, Mapping):
        raise OptionsNotAllowed("task options", f"must be a mapping, got {type(options).__name__}")
    known = set(EmbedOptions.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionsNotAllowed(f"task options.{unknown[0]}", "unknown option (a message from a newer operator? "
                                                              "upgrade the workers before the operator)")
    cpus = cpus or os.cpu_count() or 1
    _choice(options, "dtype", DTYPES)
    _choice(options, "precision", PRECISIONS)
    _choice(options, "device", DEVICES)
    _choice(options, "preprocessing", PREPROCESSINGS)
    _choice(options, "compile", COMPILE_MODES)
    _int(options, "batch_size", 0, 4096, "the schema's bound")
    _int(options, "num_threads", 0, min(settings.max_num_threads, cpus),
         f"EMBEDJOB_MAX_NUM_THREADS and its {cpus} CPUs")
    _int(options, "max_image_pixels", 1, settings.max_image_pixels, "EMBEDJOB_MAX_IMAGE_PIXELS")
    for flag in ("overwrite", "text"):
        if flag in options and not isinstance(options[flag], bool):
            raise OptionsNotAllowed(f"task options.{flag}", f"must be true or false, got {options[flag]!r}")
    field = options.get("text_json_field")
    if field is not None and (not isinstance(field, str) or not 0 < len(field) <= 256):
        raise OptionsNotAllowed("task options.text_json_field", f"must be a name of 1-256 characters, got {field!r}")
    if options.get("scores") is not None and not isinstance(options["scores"], Mapping):
        raise OptionsNotAllowed("task options.scores", f"must be a mapping, got {type(options['scores']).__name__}")
    for head_name, head in (options.get("scores") or {}).items():
        if not isinstance(head, Mapping):
            raise OptionsNotAllowed(f"task options.scores.{head_name}", "must be a mapping")
        if head.get("name") and not model_allowed(settings, str(head["name"]), head.get("revision")):
            raise OptionsNotAllowed(f"task options.scores.{head_name}",
                                    f"{head['name']}@{head.get('revision') or 'main'} is not on this worker's model "
                                    f"allow-list ({_listed(settings)})")
    if not isinstance(model, Mapping):
        raise OptionsNotAllowed("task model", f"must be a mapping, got {type(model).__name__}")
    name, revision, path = model.get("name"), model.get("revision"), model.get("path")
    if not path and not model_allowed(settings, str(name or ""), revision):
        raise OptionsNotAllowed("task model", f"{name}@{revision or 'main'} is not on this worker's model "
                                              f"allow-list ({_listed(settings)})")
    return EmbedOptions(**options)
