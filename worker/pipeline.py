"""embed_shard: one WebDataset .tar in, the per-shard outputs of embedjob.layout out.

CONTRACT (other modules code against this; keep it stable):

    embed_shard(shard: str, output: str, model: Embedder, options: EmbedOptions, *,
                stem: str | None = None, storage: Storage | None = None,
                on_progress: Callable[[int], None] | None = None) -> ShardResult

- ``shard``: s3:// URI or local path of the .tar; ``output``: output root URI or local folder.
- ``stem``: output stem (default: the shard's basename without .tar).
- ``model``: a loaded embedder (embedjob.worker.model.load_embedder), loaded once per process.
- ``on_progress(n)``: called with the number of images embedded so far (cheap; may be called often).
- Skips (status "skipped") when the manifest exists and options.overwrite is false.
- Raises only for shard-level failures that leave no usable output (e.g. the shard cannot be
  opened at all); a corrupt/truncated tar keeps what was read and records the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ShardResult:
    shard: str
    stem: str
    status: str  # "done" | "skipped"
    images: int = 0  # rows written to the .npy
    failed: int = 0  # samples skipped and recorded in the manifest
    seconds: float = 0.0
    manifest: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)
