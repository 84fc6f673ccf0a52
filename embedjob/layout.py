"""The output layout downstream tools read: the one place that knows where a shard's files go.

For input shard ``<stem>.tar`` under ``output.uri``::

    img_emb/<stem>.npy          [N, D] L2-normalised embeddings
    text_emb/<stem>.npy         [N, D] the captions' embeddings, row i = image row i (text outputs only)
    metadata/<stem>.parquet     one row per .npy row, same order
    _manifests/<stem>.json      written last; its presence means "this shard is done"
    _job.json                   job-level manifest, written when the whole job succeeds
    report.html                 `embedjob report`'s page (cluster mode: with spec.output.report)
"""

from __future__ import annotations

from dataclasses import dataclass

from embedjob.storage import join

EMB_DIR = "img_emb"
TEXT_EMB_DIR = "text_emb"
META_DIR = "metadata"
MANIFEST_DIR = "_manifests"
TMP_DIR = "_tmp"
JOB_MANIFEST = "_job.json"
REPORT_FILE = "report.html"
SHARD_SUFFIX = ".tar"


@dataclass(frozen=True)
class ShardOutputs:
    """Final URIs of one shard's outputs."""

    embeddings: str
    metadata: str
    manifest: str
    tmp_root: str
    text_embeddings: str = ""


def shard_outputs(output_uri: str, stem: str) -> ShardOutputs:
    return ShardOutputs(
        embeddings=join(output_uri, EMB_DIR, f"{stem}.npy"),
        metadata=join(output_uri, META_DIR, f"{stem}.parquet"),
        manifest=join(output_uri, MANIFEST_DIR, f"{stem}.json"),
        tmp_root=tmp_root(output_uri),
        text_embeddings=join(output_uri, TEXT_EMB_DIR, f"{stem}.npy"),
    )


def tmp_root(output_uri: str) -> str:
    """Where S3 temporary keys go before they are committed under a final name."""
    return join(output_uri, TMP_DIR)


def report_uri(output_uri: str) -> str:
    return join(output_uri, REPORT_FILE)


def job_manifest_uri(output_uri: str) -> str:
    return join(output_uri, JOB_MANIFEST)


def manifests_prefix(output_uri: str) -> str:
    return join(output_uri, MANIFEST_DIR) + "/"


def stem_from_manifest(manifest_uri: str, output_uri: str) -> str:
    """Inverse of ``shard_outputs(...).manifest``."""
    prefix = manifests_prefix(output_uri)
    if not manifest_uri.startswith(prefix) or not manifest_uri.endswith(".json"):
        raise ValueError(f"{manifest_uri!r} is not a shard manifest under {output_uri!r}")
    return manifest_uri[len(prefix) : -len(".json")]


def shard_stem(shard_uri: str, input_root: str) -> str:
    """The shard's path relative to the input root, without ``.tar`` (sub-folders kept), so two
    shards never share outputs."""
    root = input_root.rstrip("/") + "/" if input_root else ""
    rel = shard_uri[len(root) :] if root and shard_uri.startswith(root) else shard_uri.rsplit("/", 1)[-1]
    rel = rel.lstrip("/")
    if rel.lower().endswith(SHARD_SUFFIX):
        rel = rel[: -len(SHARD_SUFFIX)]
    if not rel:
        raise ValueError(f"empty shard stem for {shard_uri!r} under {input_root!r}")
    return rel
