"""Who may use the workers' storage credentials: the storage allow-list. Torch-free.

The workers hold one set of S3 credentials for every job. ``EMBEDJOB_STORAGE_ALLOW_LIST`` (a JSON
object, namespace or ``"*"`` -> list of ``s3://bucket/prefix/``) says where a job may read its input
and write its output with them; the chart value ``storageAllowList`` sets it for the operator and the
workers alike.

- The operator checks every job against the prefixes of its namespace plus those of ``"*"``: a job
  outside them is refused (phase Failed, condition ``Failed`` with reason ``InvalidSpec`` and a
  message naming the field: ``spec.input.uri``, ``spec.input.shards[3]``, ``spec.output.uri``,
  ``spec.model.path``).
- Every worker checks every task message again before it touches storage (defence in depth against
  anyone else who can write to Redis): input, output and model path must be under SOME allowed
  prefix (a message's namespace cannot be trusted, so the worker checks the union of all entries),
  and local paths are refused unless ``EMBEDJOB_ALLOW_LOCAL_PATHS`` allows them. A refused message
  records a hard failure (``errorCode: StorageNotAllowed``) and nothing is embedded.

A local ``model.path`` under the workers' own model cache (``EMBEDJOB_MODEL_DIR``, the chart's
``worker.modelCache`` mount, e.g. a pre-loaded PVC) is always allowed: the operator of the release
controls what is there. No allow-list (unset) restricts no S3 prefix; ``embedjob run`` keeps local
paths (``EMBEDJOB_ALLOW_LOCAL_PATHS`` defaults to true, the chart sets it false for the workers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from embedjob.settings import Settings, s3_defaults
from embedjob.spec import JobSpec, SpecError

NOT_ALLOWED = "StorageNotAllowed"


class StorageNotAllowed(SpecError):  # noqa: N818 - named after the outcome it records
    """A location outside the storage allow-list (or a local path where none is allowed)."""


def _prefix(p: str) -> str:
    # "s3://bucket" and "s3://bucket/" both mean the whole bucket; "s3://b/pre" means keys under pre/.
    return p if p.endswith("/") else p + "/"


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass(frozen=True)
class AccessPolicy:
    allow: tuple[tuple[str, tuple[str, ...]], ...] | None = None  # None: any S3 location
    local_paths: bool = True
    model_dir: str = ""
    endpoint: str | None = None  # the workers' own S3 endpoint (AWS_ENDPOINT_URL); None: AWS's

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        return cls(settings.storage_allow_list, settings.allow_local_paths, settings.model_dir,
                   s3_defaults()[0])

    def check_endpoint(self, field: str, endpoint: str | None) -> None:
        """With an allow-list, a bucket name means a bucket of the workers' own S3 service: a job may not
        point the workers' credentials at another endpoint (``spec.storage.endpoint``) unless it is
        that one."""
        if self.allow is None or not endpoint:
            return
        if endpoint.rstrip("/") != (self.endpoint or "").rstrip("/"):
            own = self.endpoint or "AWS's default"
            raise StorageNotAllowed(field, f"{endpoint!r}: with the storage allow-list, only the workers' own "
                                           f"S3 endpoint ({own}) may be used; leave it empty")

    def prefixes(self, namespace: str | None) -> list[str]:
        """The prefixes a job of ``namespace`` may use; None: every namespace's (the workers' view)."""
        if self.allow is None:
            return []
        return [_prefix(p) for ns, ps in self.allow for p in ps if namespace is None or ns in ("*", namespace)]

    def check(self, field: str, uri: str, namespace: str | None = None, *, model: bool = False) -> None:
        """Raise :class:`StorageNotAllowed` naming ``field`` when ``uri`` may not be used."""
        if _is_local(uri):
            if self.local_paths or (model and self.model_dir and _under(uri, self.model_dir)):
                return
            where = f" (a model folder must be under the workers' model cache {self.model_dir})" if model else ""
            raise StorageNotAllowed(field, f"local paths are not allowed here, got {uri!r}{where}")
        if self.allow is None:
            return
        allowed = self.prefixes(namespace)
        key = uri if uri.endswith("/") else uri + "/"  # "s3://bucket" matches the prefix "s3://bucket/"
        if any(uri.startswith(p) or key == p for p in allowed):
            return
        scope = f"namespace {namespace!r}" if namespace is not None else "any namespace"
        listed = ", ".join(allowed) if allowed else "nothing"
        raise StorageNotAllowed(field, f"{uri!r} is outside the storage allow-list for {scope} (allowed: {listed})")

    def check_job(self, spec: JobSpec, namespace: str | None) -> None:
        """The operator's check of an accepted spec (the first field refused is raised)."""
        if spec.input.uri is not None:
            self.check("spec.input.uri", spec.input.uri, namespace)
        for i, s in enumerate(spec.input.shards or ()):
            self.check(f"spec.input.shards[{i}]", s, namespace)
        self.check("spec.output.uri", spec.output.uri, namespace)
        if spec.model.path:
            self.check("spec.model.path", spec.model.path, namespace, model=True)
        self.check_endpoint("spec.storage.endpoint", spec.storage.endpoint)

    def check_task(self, shard: str, output: str, model_path: str | None, endpoint: str | None = None) -> None:
        """The worker's check of one task message (namespace unknown: the union of every entry)."""
        self.check_endpoint("task storage.endpoint", endpoint)
        checks: Iterable[tuple[str, str, bool]] = [("input", shard, False), ("output", output, False)]
        if model_path:
            checks = [*checks, ("model.path", model_path, True)]
        for field, uri, is_model in checks:
            self.check(f"task {field}", uri, None, model=is_model)
