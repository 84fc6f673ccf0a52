"""Who may use the workers' storage credentials: the storage allow-list. Torch-free.

The workers hold one set of S3 credentials for every job. ``EMBEDJOB_STORAGE_ALLOW_LIST`` (a JSON
object, namespace or ``"*"`` -> list of ``s3://bucket/prefix/``) says where a job may read its input
and write its output with them; the chart sets it for the operator and the workers alike, and refuses
to render without a storage policy when it watches every namespace.

- A prefix may hold ``{namespace}``: ``"*": ["s3://tenants/{namespace}/"]`` gives every namespace its
  own folder (the chart's ``storageNamespaceBuckets``). ``"*": ["*"]`` is the explicit opt-out: any
  S3 location (the endpoint stays pinned).
- The operator checks every job against the prefixes of its namespace plus those of ``"*"``, wherever
  a plan is made or re-made (accept, recovery) and before every message it sends: a job outside them
  fails with reason ``StorageNotAllowed`` and a message naming the field (``spec.input.uri``,
  ``spec.input.shards[3]``, ``spec.output.uri``, ``spec.model.path``, ``spec.storage.endpoint``).
- Every worker checks every task message again before it touches storage (defence in depth against
  anyone else who can write to Redis): input, output and model path must be under SOME allowed
  prefix (a message's namespace cannot be trusted, so the worker checks the union of all entries,
  ``{namespace}`` matching any one segment), the stem must be clean, and local paths are refused
  unless ``EMBEDJOB_ALLOW_LOCAL_PATHS`` allows them. A refused message records a hard failure
  (``errorCode: StorageNotAllowed``) and nothing is embedded.
- With a policy, a bucket name means a bucket of the workers' own S3 service: ``spec.storage.endpoint``
  must be empty, the workers' own (``AWS_ENDPOINT_URL``) or one of ``EMBEDJOB_STORAGE_ENDPOINTS``.
- Every location is checked for hygiene first (embedjob.uris): no ``.``/``..``/empty segment, no
  control character, and no scheme but ``s3://`` (anything else is a local path).

A local ``model.path`` under the workers' own model cache (``EMBEDJOB_MODEL_DIR``, the chart's
``worker.modelCache`` mount, e.g. a pre-loaded PVC) is always allowed: the operator of the release
controls what is there. No allow-list (unset, ``embedjob run``) restricts no S3 prefix and no
endpoint; ``embedjob run`` keeps local paths (``EMBEDJOB_ALLOW_LOCAL_PATHS`` defaults to true, the
chart sets it false).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from embedjob import uris
from embedjob.settings import Settings, s3_defaults
from embedjob.spec import JobSpec, SpecError

NOT_ALLOWED = "StorageNotAllowed"
ANYWHERE = "*"
NAMESPACE = "{namespace}"
_NS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"  # a namespace name (an RFC 1123 label)


class StorageNotAllowed(SpecError):  # noqa: N818 - named after the outcome it records
    """A location outside the storage allow-list (or a local path where none is allowed)."""


def _prefix(p: str) -> str:
    # "s3://bucket" and "s3://bucket/" both mean the whole bucket; "s3://b/pre" means keys under pre/.
    return p if p.endswith("/") or p == ANYWHERE else p + "/"


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _matches(uri: str, prefix: str) -> bool:
    """``uri`` lies under ``prefix``; a ``{namespace}`` left in the prefix (the workers' view) matches
    any one segment."""
    if prefix == ANYWHERE:
        return True
    key = uri if uri.endswith("/") else uri + "/"  # "s3://bucket" matches the prefix "s3://bucket/"
    if NAMESPACE not in prefix:
        return uri.startswith(prefix) or key == prefix
    pattern = "".join(re.escape(part) if part != NAMESPACE else _NS_LABEL
                      for part in re.split(r"(\{namespace\})", prefix))
    return re.match(pattern, key) is not None


def _norm_endpoint(e: str | None) -> str:
    return (e or "").rstrip("/")


@dataclass(frozen=True)
class AccessPolicy:
    allow: tuple[tuple[str, tuple[str, ...]], ...] | None = None  # None: any S3 location
    local_paths: bool = True
    model_dir: str = ""
    endpoint: str | None = None  # the workers' own S3 endpoint (AWS_ENDPOINT_URL); None: AWS's
    endpoints: tuple[str, ...] = ()  # other endpoints the admin allows (EMBEDJOB_STORAGE_ENDPOINTS)

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        return cls(settings.storage_allow_list, settings.allow_local_paths, settings.model_dir,
                   s3_defaults()[0], settings.storage_endpoints)

    def check_endpoint(self, field: str, endpoint: str | None) -> None:
        """With a storage policy, a bucket name means a bucket of the workers' own S3 service: a job may
        not point the workers' credentials at another endpoint (``spec.storage.endpoint``) unless it is
        that one or one the admin listed."""
        if self.allow is None or not endpoint:
            return
        allowed = {_norm_endpoint(self.endpoint)} | {_norm_endpoint(e) for e in self.endpoints}
        if _norm_endpoint(endpoint) not in allowed:
            own = self.endpoint or "AWS's default"
            extra = f" or one of {', '.join(self.endpoints)}" if self.endpoints else ""
            raise StorageNotAllowed(field, f"{endpoint!r}: with the storage policy, only the workers' own "
                                           f"S3 endpoint ({own}){extra} may be used; leave it empty")

    def prefixes(self, namespace: str | None) -> list[str]:
        """The prefixes a job of ``namespace`` may use; None: every namespace's (the workers' view)."""
        if self.allow is None:
            return []
        out = [_prefix(p) for ns, ps in self.allow for p in ps if namespace is None or ns in ("*", namespace)]
        return [p.replace(NAMESPACE, namespace) if namespace is not None else p for p in out]

    def check(self, field: str, uri: str, namespace: str | None = None, *, model: bool = False) -> None:
        """Raise :class:`StorageNotAllowed` naming ``field`` when ``uri`` may not be used."""
        try:
            local = uris.scheme_of(str(uri)) == ""
            uris.check_uri(uri)
        except uris.UnsafeURI as e:
            raise StorageNotAllowed(field, str(e)) from e
        if local:
            if self.local_paths or (model and self.model_dir and _under(uri, self.model_dir)):
                return
            where = f" (a model folder must be under the workers' model cache {self.model_dir})" if model else ""
            raise StorageNotAllowed(field, f"local paths are not allowed here, got {uri!r}{where}")
        if self.allow is None:
            return
        allowed = self.prefixes(namespace)
        if any(_matches(uri, p) for p in allowed):
            return
        scope = f"namespace {namespace!r}" if namespace is not None else "any namespace"
        listed = ", ".join(allowed) if allowed else "nothing"
        raise StorageNotAllowed(field, f"{uri!r} is outside the storage allow-list for {scope} (allowed: {listed})")

    def check_job(self, spec: JobSpec, namespace: str | None) -> None:
        """The operator's check of a spec, wherever a plan is made or re-made (the first field refused
        is raised)."""
        self.check_endpoint("spec.storage.endpoint", spec.storage.endpoint)
        if spec.input.uri is not None:
            self.check("spec.input.uri", spec.input.uri, namespace)
        for i, s in enumerate(spec.input.shards or ()):
            self.check(f"spec.input.shards[{i}]", s, namespace)
        self.check("spec.output.uri", spec.output.uri, namespace)
        if spec.model.path:
            self.check("spec.model.path", spec.model.path, namespace, model=True)

    def check_task(self, shard: str, output: str, model_path: str | None, endpoint: str | None = None,
                   namespace: str | None = None, stem: str | None = None) -> None:
        """One task message: the worker's check (``namespace`` unknown: the union of every entry), and
        the operator's before it sends one (with the job's namespace)."""
        self.check_endpoint("task storage.endpoint", endpoint)
        checks: Iterable[tuple[str, str, bool]] = [("input", shard, False), ("output", output, False)]
        if model_path:
            checks = [*checks, ("model.path", model_path, True)]
        for field, uri, is_model in checks:
            self.check(f"task {field}", uri, namespace, model=is_model)
        if stem is not None:
            try:
                uris.check_stem(stem)
            except uris.UnsafeURI as e:
                raise StorageNotAllowed("task stem", str(e)) from e
