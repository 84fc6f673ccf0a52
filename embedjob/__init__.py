"""embedjob: CLIP image embeddings for WebDataset shards in object storage.

Public API for reading results back::

    import embedjob
    keys, emb = embedjob.read_embeddings("s3://embeddings/laion-subset/")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["read_embeddings", "read_shard", "iter_shards", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import embedjob` stays cheap for the operator and the CLI.
    if name in ("read_embeddings", "read_shard", "iter_shards"):
        from embedjob import results

        return getattr(results, name)
    raise AttributeError(f"module 'embedjob' has no attribute {name!r}")
