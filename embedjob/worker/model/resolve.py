"""Where a job's model comes from, decided before any work: a local folder (``spec.model.path``), the
model cache (``EMBEDJOB_MODEL_DIR``), or the Hugging Face hub. Torch-free (huggingface_hub only).

An offline machine is told at once, in one message that names the field and what to set, instead of
after the hub client's retries: a model in the cache is loaded from it alone (``local_files_only``);
one that is not, with ``HF_HUB_OFFLINE=1`` or the hub unreachable, is :class:`ModelUnavailable`.
``embedjob model fetch`` fills a cache (or a folder for ``spec.model.path``, e.g. a PVC) ahead of a job.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# What a job needs from a checkpoint: the config and the safetensors weights (never pickles or code).
# A SigLIP checkpoint's tokenizer files too (SentencePiece model and its config; for text outputs).
FETCH_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json",
                  "spiece.model", "tokenizer_config.json", "special_tokens_map.json"]
HUB_PROBE_SECONDS = 3.0


class ModelUnavailable(Exception):
    """The model cannot be resolved here. ``field`` is the spec field to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Resolved:
    kind: str  # "path" | "cache" | "hub"
    where: str  # the folder, or the hub endpoint

    @property
    def local_only(self) -> bool:
        """Load without asking the hub (a folder, or a model already in the cache)."""
        return self.kind != "hub"

    def describe(self, name: str | None, revision: str | None) -> str:
        at = f" at revision {revision}" if revision else ""
        if self.kind == "path":
            return f"the local folder {self.where}"
        if self.kind == "cache":
            return f"{name}{at} from the model cache ({self.where})"
        return f"{name}{at}, to be downloaded from the Hugging Face hub ({self.where}) into the model cache"


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """One quick TCP connect to the hub, instead of its client's retries."""
    url = urlparse(hub_endpoint())
    try:
        with socket.create_connection((url.hostname or "", url.port or (80 if url.scheme == "http" else 443)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def _fields(model: Any) -> tuple[str | None, str | None, str | None]:
    get = model.get if isinstance(model, dict) else (lambda k, d=None: getattr(model, k, d))
    return get("name") or None, get("revision") or None, get("path") or None


def _what_to_set(name: str, revision: str | None, cache_dir: str) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"Set spec.model.path to a local copy of the model, or fill the model cache ahead of the job: "
            f"`embedjob model fetch {name}{rev}` on a machine with access to the hub (EMBEDJOB_MODEL_DIR="
            f"{cache_dir}; in a cluster, a PVC as worker.modelCache.existingClaim), then run with HF_HUB_OFFLINE=1")


def resolve_model(model: Any, cache_dir: str, probe: bool = True) -> Resolved:
    """Where ``model`` (a ModelSpec or a dict with name/revision/path) will be loaded from. Raises
    :class:`ModelUnavailable` naming ``spec.model.path`` or ``spec.model.name`` when it cannot be."""
    name, revision, path = _fields(model)
    if path:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            what = "does not exist" if not folder.exists() else "holds no config.json (not a model folder)"
            raise ModelUnavailable("spec.model.path", f"{path} {what}")
        return Resolved("path", str(folder.resolve()))
    if not name:
        raise ModelUnavailable("spec.model", "needs a name (Hugging Face id) or a path")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name, "config.json", revision=revision, cache_dir=cache_dir, local_files_only=True)
        return Resolved("cache", cache_dir)
    except Exception:  # noqa: BLE001 - not in the cache (any reason): ask the hub below
        pass
    at = f" at revision {revision}" if revision else ""
    if hub_offline():
        raise ModelUnavailable("spec.model.name", f"{name!r}{at} is not in the model cache ({cache_dir}) and "
                                                  f"HF_HUB_OFFLINE is set. {_what_to_set(name, revision, cache_dir)}")
    if probe and not hub_reachable():
        raise ModelUnavailable("spec.model.name", f"{name!r}{at} is not in the model cache ({cache_dir}) and the "
                                                  f"Hugging Face hub ({hub_endpoint()}) cannot be reached from this "
                                                  f"machine. {_what_to_set(name, revision, cache_dir)}")
    return Resolved("hub", hub_endpoint())


def fetch_model(name: str, revision: str | None = None, cache_dir: str | None = None,
                to: str | None = None) -> Path:
    """Download what a job needs of ``name`` (config and safetensors weights): into the model cache
    ``cache_dir`` (then ``spec.model.name`` loads offline), or into the folder ``to`` (then
    ``spec.model.path: <to>``). Returns the folder holding the files."""
    from huggingface_hub import snapshot_download

    if to:
        return Path(snapshot_download(name, revision=revision, local_dir=to, allow_patterns=FETCH_PATTERNS))
    return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=FETCH_PATTERNS))
