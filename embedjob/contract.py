"""The task contract between the operator (producer) and the workers (consumers). Torch-free.

A task's arguments are plain JSON data: where the shard is, where its outputs go, which model and
settings. Never credentials: workers read those from their own environment.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from embedjob.spec import InferenceSpec, JobSpec, ModelSpec
from embedjob.storage import StorageOptions

TASK_NAME = "embedjob.embed_shard"
# The job's report (spec.output.report): sent once by the operator when the job succeeds. Its arguments:
# {"job": the progress namespace, "output": output root, "storage": endpoint/region}.
REPORT_TASK_NAME = "embedjob.write_report"
# Bumped whenever the task's argument shape changes incompatibly.
CONTRACT_VERSION = 1


@dataclass(frozen=True)
class EmbedOptions:
    """Per-shard processing options (everything except where the shard and outputs live)."""

    dtype: str = "float16"
    batch_size: int = 0  # 0: tuned on the device (embedjob.worker.model.embedder.Embedder.resolve_batch_size)
    precision: str = "auto"
    device: str = "auto"
    num_threads: int = 0  # decode workers; 0: every CPU the worker process may use
    max_image_pixels: int = InferenceSpec().maxImagePixels
    overwrite: bool = False
    preprocessing: str = "exact"  # "exact" (OpenAI's reference, bit for bit) | "fast" (opt-in)
    compile: str = "none"  # torch.compile mode: none | default | reduce-overhead | max-autotune
    on_truncated: str = "record"  # spec.onTruncatedShard: record (keep what was read, count the loss) | fail
    # spec.scores: {score: {name, revision, path, file}} of the heads to run on the embeddings (None: none)
    scores: dict[str, dict[str, Any]] | None = None
    text: bool = False  # spec.outputs has text: caption embeddings too (text_emb/, has_caption, clip_score)
    text_json_field: str | None = None  # spec.text.jsonField: the caption is this field of the .json sidecar

    @classmethod
    def from_spec(cls, spec: JobSpec) -> EmbedOptions:
        i = spec.inference
        return cls(
            dtype=spec.output.dtype,
            batch_size=i.batchSize,
            precision=i.precision,
            device=i.device,
            num_threads=i.numThreads,
            max_image_pixels=i.maxImagePixels,
            overwrite=spec.output.overwrite,
            preprocessing=i.preprocessing,
            compile=i.compile,
            on_truncated=spec.onTruncatedShard,
            scores={k: asdict(v) for k, v in spec.scores.heads().items()} or None,
            text="text" in spec.outputs,
            text_json_field=spec.text.jsonField,
        )


@dataclass(frozen=True)
class ShardTask:
    """Arguments of one ``embedjob.embed_shard`` task."""

    job: str  # progress namespace in Redis (the resource's uid, or a local job id)
    shard: str  # input URI of the .tar
    stem: str  # output stem (see embedjob.layout)
    output: str  # output root URI
    model: dict[str, Any] = field(default_factory=lambda: asdict(ModelSpec()))
    options: dict[str, Any] = field(default_factory=lambda: asdict(EmbedOptions()))
    storage: dict[str, Any] = field(default_factory=dict)  # endpoint/region only
    attempt: int = 1
    version: int = CONTRACT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardTask:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def build(cls, job_id: str, spec: JobSpec, shard_uri: str, stem: str, attempt: int = 1) -> ShardTask:
        return cls(
            job=job_id,
            shard=shard_uri,
            stem=stem,
            output=spec.output.uri,
            model=asdict(spec.model),
            options=asdict(EmbedOptions.from_spec(spec)),
            storage=StorageOptions.from_spec(spec).to_dict(),
            attempt=attempt,
        )


def task_id(job_id: str, stem: str, attempt: int) -> str:
    """Deterministic Celery task id: enqueueing the same (job, shard, attempt) twice names the same
    task, so an operator restart mid-enqueue is recognisable."""
    digest = hashlib.sha1(stem.encode()).hexdigest()[:20]
    return f"ej-{job_id}-{digest}-{attempt}"


def report_task_id(job_id: str) -> str:
    """The report task's id: one per job (a resend after an operator restart names the same task)."""
    return f"ej-{job_id}-report"


def task_id_prefix(job_id: str) -> str:
    return f"ej-{job_id}-"
