"""The EmbeddingJob spec: one loader and validator for ``embedjob run`` and the operator.

The CRD's OpenAPI schema rejects what it can at ``kubectl apply``; this module applies the same
rules (and the semantic ones a schema cannot express) to a job file or a resource's spec, and names
the offending field in every error.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedjob import uris

API_GROUP = "embedjob.io"
API_VERSION = "v1alpha1"
KIND = "EmbeddingJob"
PLURAL = "embeddingjobs"

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
# Pinned revision of openai/clip-vit-large-patch14 (model.safetensors is 1,710,540,580 bytes).
DEFAULT_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"
DTYPES = ("float16", "float32")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
# exact: OpenAI CLIP's reference transform, bit for bit. fast (opt-in): JPEGs decoded at reduced scale
# on the CPU (>= 2x the target) or by nvJPEG on the GPU; its deviation is measured by `embedjob bench`.
PREPROCESSINGS = ("exact", "fast")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
# A truncated or partly unreadable tar: record it (the samples before the damage are kept and the loss
# is counted) or fail the shard (nothing committed, so a rerun tries it again).
ON_TRUNCATED = ("record", "fail")
# Pillow's own decompression-bomb threshold; larger images are skipped and recorded.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# What a job writes: image embeddings always; caption embeddings too with "text".
OUTPUT_KINDS = ("image", "text")

S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,62}$")
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SpecError(ValueError):
    """A job spec is invalid. ``field`` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class InputSpec:
    uri: str | None = None
    shards: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputSpec:
    uri: str
    dtype: str = "float16"
    overwrite: bool = False
    report: bool = False  # cluster mode: a worker writes report.html (embedjob report) when the job succeeds


@dataclass(frozen=True)
class ModelSpec:
    """A hub ``name`` at ``revision``, or a local ``path`` (which wins: with a path and no name, no hub
    id is implied, so none is ever recorded)."""

    name: str | None = DEFAULT_MODEL
    revision: str | None = DEFAULT_REVISION
    path: str | None = None


# Score heads computed on the image embeddings (embedjob.worker.model.heads): name -> what it is.
SCORE_HEADS = {
    "aesthetic": "LAION improved aesthetic predictor v2 (768-1024-128-64-16-1)",
    "nsfw": "LAION CLIP-based NSFW detector (normalisation, 768-64-512-256-1, sigmoid)",
}
# Both heads were trained on ViT-L/14 image embeddings; their published weights take 768-wide input.
HEAD_WIDTH = 768
# Embedding widths of hub models known without loading them (a local folder's comes from its config.json).
KNOWN_MODEL_DIMS = {DEFAULT_MODEL: 768}


@dataclass(frozen=True)
class HeadSpec:
    """A score head's weights: a local ``path`` (a .safetensors or .pth file), or ``file`` of the hub
    repository ``name`` at ``revision``."""

    name: str | None = None
    revision: str | None = None
    path: str | None = None
    file: str | None = None


@dataclass(frozen=True)
class ScoresSpec:
    aesthetic: HeadSpec | None = None
    nsfw: HeadSpec | None = None

    def heads(self) -> dict[str, HeadSpec]:
        """The heads asked for, by score name."""
        return {k: v for k, v in (("aesthetic", self.aesthetic), ("nsfw", self.nsfw)) if v is not None}


@dataclass(frozen=True)
class InferenceSpec:
    batchSize: int = 0  # noqa: N815 - mirrors the CRD field name; 0: tuned on the device
    precision: str = "auto"
    device: str = "auto"
    numThreads: int = 0  # noqa: N815 - decode workers; 0: every CPU the worker may use
    maxImagePixels: int = DEFAULT_MAX_IMAGE_PIXELS  # noqa: N815
    preprocessing: str = "exact"
    compile: str = "none"


@dataclass(frozen=True)
class TextSpec:
    """Where a sample's caption is (with ``outputs: [image, text]``): its ``.txt`` member, or the field
    ``jsonField`` of its ``.json`` sidecar when set."""

    jsonField: str | None = None  # noqa: N815 - mirrors the CRD field name


@dataclass(frozen=True)
class StorageSpec:
    endpoint: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class RetrySpec:
    perShard: int = 3  # noqa: N815
    backoffSeconds: int = 30  # noqa: N815


@dataclass(frozen=True)
class JobSpec:
    input: InputSpec
    output: OutputSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    queue: str = "embedjob"
    retries: RetrySpec = field(default_factory=RetrySpec)
    maxFailedShards: int = 0  # noqa: N815
    parallelism: int = 0  # max shards queued+running at once (0 = no limit)
    priority: int = 0  # share of a queue shared with other jobs: each step up doubles it (-10..10)
    suspend: bool = False
    ttlSecondsAfterFinished: int | None = None  # noqa: N815
    onTruncatedShard: str = "record"  # noqa: N815 - record | fail (ON_TRUNCATED)
    scores: ScoresSpec = field(default_factory=ScoresSpec)
    outputs: tuple[str, ...] = ("image",)  # OUTPUT_KINDS: ("image",) | ("image", "text")
    text: TextSpec = field(default_factory=TextSpec)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input"]["shards"] = list(self.input.shards)
        d["outputs"] = list(self.outputs)
        return d


@dataclass(frozen=True)
class Job:
    name: str
    namespace: str
    spec: JobSpec


# -- validation helpers ------------------------------------------------------------------------------
def _mapping(value: Any, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a mapping, got {type(value).__name__}")
    return value


def _unknown(d: dict, allowed: set[str], path: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise SpecError(f"{path}.{extra[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _int(d: dict, key: str, path: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    if key not in d or d[key] is None:
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"{path}.{key}", f"must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise SpecError(f"{path}.{key}", f"must be {bound}, got {v}")
    return v


def _bool(d: dict, key: str, path: str, default: bool) -> bool:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise SpecError(f"{path}.{key}", f"must be true or false, got {v!r}")
    return v


def _str(d: dict, key: str, path: str, default: str | None, choices: tuple[str, ...] | None = None) -> str | None:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str) or not v:
        raise SpecError(f"{path}.{key}", f"must be a non-empty string, got {v!r}")
    if choices and v not in choices:
        raise SpecError(f"{path}.{key}", f"must be one of {', '.join(choices)}, got {v!r}")
    return v


def check_location(uri: str, path: str, allow_local: bool) -> str:
    """``s3://bucket/...`` always; a local path only where allowed (``embedjob run``); no other scheme,
    and no ``.``/``..``/empty segment or control character (embedjob.uris)."""
    try:
        local = uris.scheme_of(uri) == ""
        if not local:  # a local path is checked once resolved (a job file's ../data/ is fine)
            uris.check_uri(uri)
        elif uris.bad_character(uri):
            uris.check_uri(uri)
    except uris.UnsafeURI as e:
        raise SpecError(path, str(e)) from e
    if not local:
        if not S3_URI.match(uri):
            raise SpecError(path, f"invalid S3 URI {uri!r} (want s3://<bucket>/<prefix>, DNS-style bucket name)")
        return uri
    if not allow_local:
        raise SpecError(path, f"must be an s3:// URI, got {uri!r}")
    return uri


def parse_spec(spec: Any, allow_local: bool = True, base_dir: Path | None = None) -> JobSpec:
    """Validate a spec mapping and fill defaults. Raises :class:`SpecError` naming the field."""
    spec = _mapping(spec, "spec")
    _unknown(
        spec,
        {"input", "output", "model", "inference", "storage", "queue", "retries", "maxFailedShards",
         "parallelism", "priority", "suspend", "ttlSecondsAfterFinished", "onTruncatedShard", "scores", "outputs",
         "text"},
        "spec",
    )

    def local(p: str, where: str = "") -> str:
        if p.startswith("s3://"):
            return p
        p = str(Path(p).expanduser()) if p.startswith("~") else p
        if base_dir is not None and not Path(p).is_absolute():
            p = str((base_dir / p).resolve())
        try:
            return uris.check_uri(p)
        except uris.UnsafeURI as e:
            raise SpecError(where, str(e)) from e

    # input
    if "input" not in spec:
        raise SpecError("spec.input", "is required")
    inp = _mapping(spec["input"], "spec.input")
    _unknown(inp, {"uri", "shards"}, "spec.input")
    uri = inp.get("uri")
    shards = inp.get("shards")
    if uri is None and shards is None:
        raise SpecError("spec.input", "needs either uri (prefix, brace pattern or one .tar) or shards (a list)")
    if uri is not None and shards is not None:
        raise SpecError("spec.input", "give either uri or shards, not both")
    if uri is not None:
        if not isinstance(uri, str) or not uri:
            raise SpecError("spec.input.uri", f"must be a non-empty string, got {uri!r}")
        uri = local(check_location(uri, "spec.input.uri", allow_local), "spec.input.uri")
        input_spec = InputSpec(uri=uri)
    else:
        if not isinstance(shards, list) or not shards:
            raise SpecError("spec.input.shards", "must be a non-empty list of shard URIs")
        out = []
        for i, s in enumerate(shards):
            if not isinstance(s, str) or not s:
                raise SpecError(f"spec.input.shards[{i}]", f"must be a non-empty string, got {s!r}")
            if not s.lower().endswith(".tar"):
                raise SpecError(f"spec.input.shards[{i}]", f"must name a .tar shard, got {s!r}")
            out.append(local(check_location(s, f"spec.input.shards[{i}]", allow_local), f"spec.input.shards[{i}]"))
        if len(set(out)) != len(out):
            raise SpecError("spec.input.shards", "lists the same shard twice")
        input_spec = InputSpec(shards=tuple(out))

    # output
    if "output" not in spec:
        raise SpecError("spec.output", "is required")
    o = _mapping(spec["output"], "spec.output")
    _unknown(o, {"uri", "dtype", "overwrite", "report"}, "spec.output")
    out_uri = _str(o, "uri", "spec.output", None)
    if out_uri is None:
        raise SpecError("spec.output.uri", "is required")
    out_uri = local(check_location(out_uri, "spec.output.uri", allow_local), "spec.output.uri")
    output_spec = OutputSpec(
        uri=out_uri,
        dtype=_str(o, "dtype", "spec.output", "float16", DTYPES),
        overwrite=_bool(o, "overwrite", "spec.output", False),
        report=_bool(o, "report", "spec.output", False),
    )

    m = _mapping(spec.get("model"), "spec.model")
    _unknown(m, {"name", "revision", "path"}, "spec.model")
    mpath = _str(m, "path", "spec.model", None)
    # With a path and no name, no hub id is implied: the default model is only the default of the hub.
    name = _str(m, "name", "spec.model", None if mpath else DEFAULT_MODEL)
    revision = _str(m, "revision", "spec.model", DEFAULT_REVISION if name == DEFAULT_MODEL and not mpath else None)
    model_spec = ModelSpec(name=name, revision=revision, path=local(mpath, "spec.model.path") if mpath else None)

    i = _mapping(spec.get("inference"), "spec.inference")
    _unknown(i, {"batchSize", "precision", "device", "numThreads", "maxImagePixels", "preprocessing", "compile"},
             "spec.inference")
    inference_spec = InferenceSpec(
        batchSize=_int(i, "batchSize", "spec.inference", 0, 0, 4096),
        precision=_str(i, "precision", "spec.inference", "auto", PRECISIONS),
        device=_str(i, "device", "spec.inference", "auto", DEVICES),
        numThreads=_int(i, "numThreads", "spec.inference", 0, 0, 256),
        maxImagePixels=_int(i, "maxImagePixels", "spec.inference", DEFAULT_MAX_IMAGE_PIXELS, 1),
        preprocessing=_str(i, "preprocessing", "spec.inference", "exact", PREPROCESSINGS),
        compile=_str(i, "compile", "spec.inference", "none", COMPILE_MODES),
    )

    st = _mapping(spec.get("storage"), "spec.storage")
    _unknown(st, {"endpoint", "region"}, "spec.storage")
    endpoint = _str(st, "endpoint", "spec.storage", None)
    if endpoint and not re.match(r"^https?://[^\s/]+(/.*)?$", endpoint):
        raise SpecError("spec.storage.endpoint", f"must be an http(s):// URL, got {endpoint!r}")
    storage_spec = StorageSpec(endpoint=endpoint, region=_str(st, "region", "spec.storage", None))

    queue = _str(spec, "queue", "spec", "embedjob")
    if not QUEUE_NAME.match(queue):
        raise SpecError("spec.queue", f"must match {QUEUE_NAME.pattern}, got {queue!r}")

    r = _mapping(spec.get("retries"), "spec.retries")
    _unknown(r, {"perShard", "backoffSeconds"}, "spec.retries")
    retry_spec = RetrySpec(
        perShard=_int(r, "perShard", "spec.retries", 3, 0, 100),
        backoffSeconds=_int(r, "backoffSeconds", "spec.retries", 30, 0, 86400),
    )

    sc = _mapping(spec.get("scores"), "spec.scores")
    _unknown(sc, set(SCORE_HEADS), "spec.scores")
    heads: dict[str, HeadSpec] = {}
    for head in SCORE_HEADS:
        if sc.get(head) is None:
            continue
        where = f"spec.scores.{head}"
        h = _mapping(sc[head], where)
        _unknown(h, {"name", "revision", "path", "file"}, where)
        hpath, hname = _str(h, "path", where, None), _str(h, "name", where, None)
        if bool(hpath) == bool(hname):
            raise SpecError(where, "needs either path (a .safetensors or .pth file) or name (a hub id), not both")
        hfile = _str(h, "file", where, None)
        weights = hpath or hfile or "model.safetensors"
        if not weights.lower().endswith((".safetensors", ".pth", ".pt")):
            raise SpecError(f"{where}.{'path' if hpath else 'file'}",
                            f"must be a .safetensors or .pth file (weights only, never a pickle), got {weights!r}")
        if hpath and (hfile or h.get("revision")):
            raise SpecError(where, "revision and file go with name (a hub id), not with path")
        heads[head] = HeadSpec(name=hname, revision=_str(h, "revision", where, None),
                               path=local(hpath, f"{where}.path") if hpath else None,
                               file=hfile or (None if hpath else "model.safetensors"))
    scores_spec = ScoresSpec(**heads)
    outputs = _outputs(spec.get("outputs"))
    t = _mapping(spec.get("text"), "spec.text")
    _unknown(t, {"jsonField"}, "spec.text")
    text_spec = TextSpec(jsonField=_str(t, "jsonField", "spec.text", None))
    if t and "text" not in outputs:
        raise SpecError("spec.text", "is only used with text in spec.outputs (outputs: [image, text])")

    job = JobSpec(
        input=input_spec,
        output=output_spec,
        model=model_spec,
        inference=inference_spec,
        storage=storage_spec,
        queue=queue,
        retries=retry_spec,
        maxFailedShards=_int(spec, "maxFailedShards", "spec", 0, 0),
        parallelism=_int(spec, "parallelism", "spec", 0, 0),
        priority=_int(spec, "priority", "spec", 0, -10, 10),
        suspend=_bool(spec, "suspend", "spec", False),
        ttlSecondsAfterFinished=_int(spec, "ttlSecondsAfterFinished", "spec", None, 0),
        onTruncatedShard=_str(spec, "onTruncatedShard", "spec", "record", ON_TRUNCATED),
        scores=scores_spec,
        outputs=outputs,
        text=text_spec,
    )
    check_semantics(job)
    return job


def _outputs(value: Any) -> tuple[str, ...]:
    """``[image]`` (the default) or ``[image, text]``, in that order whatever order was written."""
    if value is None:
        return ("image",)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SpecError("spec.outputs", f"must be a list of output kinds ({', '.join(OUTPUT_KINDS)}), got {value!r}")
    for v in value:
        if v not in OUTPUT_KINDS:
            raise SpecError("spec.outputs", f"unknown output kind {v!r} (allowed: {', '.join(OUTPUT_KINDS)})")
    if len(set(value)) != len(value):
        raise SpecError("spec.outputs", f"lists an output kind twice: {value!r}")
    if "image" not in value:
        raise SpecError("spec.outputs", "must include image (text rows are aligned with the image rows)")
    return tuple(k for k in OUTPUT_KINDS if k in value)


def _norm(uri: str) -> str:
    return uri.rstrip("/") + "/"


def model_dim(model: ModelSpec) -> int | None:
    """The model's embedding width when it is known without loading it: a known hub id, or a local
    folder's ``config.json`` (``projection_dim``); None otherwise."""
    if model.path:
        import json

        try:
            config = json.loads((Path(model.path) / "config.json").read_text())
        except (OSError, ValueError):
            return None
        dim = config.get("projection_dim") if isinstance(config, dict) else None
        return dim if isinstance(dim, int) else None
    return KNOWN_MODEL_DIMS.get(model.name or "")


_WIDTH_KEYS = ("layers.0.weight", "linear_1.weight", "norm.mean")  # the first layer of each head


def head_width(head: HeadSpec) -> int | None:
    """The input width of a head's weights, read from a local file without loading a tensor and
    without torch: a safetensors file's header, or a ``.pth`` (torch's zip format) whose pickle is
    walked opcode by opcode, never run. None when it cannot be known here (a hub file, another
    format): the worker checks it when it loads the head."""
    if not head.path:
        return None
    path = head.path.lower()
    if path.endswith(".safetensors"):
        return _safetensors_width(head.path)
    if path.endswith((".pth", ".pt")):
        return _pth_width(head.path)
    return None


def _safetensors_width(path: str) -> int | None:
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 1 << 24)))
    except (OSError, ValueError, struct.error):
        return None
    for key in _WIDTH_KEYS:
        shape = (header.get(key) or {}).get("shape") if isinstance(header, dict) else None
        if shape:
            return int(shape[-1])
    return None


def _pth_width(path: str) -> int | None:
    """In torch's zip format each tensor of the state dict is pickled as its key, then the storage's
    persistent id (..., numel), the offset, the sizes and the strides: the ints after the key are
    ``numel, offset, *sizes, *strides``. The width is the last size of the first layer."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None or z.getinfo(name).file_size > 1 << 20:
                return None
            data = z.read(name)
        ops = list(pickletools.genops(data))
    except (OSError, ValueError, zipfile.BadZipFile, KeyError):
        return None
    for i, (op, arg, _) in enumerate(ops):
        if not (op.name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE") and arg in _WIDTH_KEYS):
            continue
        ints = [a for o, a, _ in ops[i + 1:i + 40] if o.name in ("BININT", "BININT1", "BININT2", "LONG1")]
        if len(ints) < 3:
            return None
        numel, sizes = ints[0], ints[2:]
        for ndim in (2, 1):  # a weight [out, in], or a 1-D normalisation mean [in]
            shape = sizes[:ndim]
            if len(shape) == ndim and _product(shape) == numel:
                return int(shape[-1])
        return None
    return None


def _product(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def check_head_width(field_name: str, width: int, dim: int) -> None:
    """A head takes embeddings of exactly the model's width."""
    if width != dim:
        raise SpecError(field_name, f"the head takes {width}-wide embeddings but the model (spec.model) makes "
                                    f"{dim}-wide ones: use the head trained for this model, or the model it was "
                                    "trained for")


def check_semantics(spec: JobSpec) -> None:
    """Rules a schema cannot express."""
    dim = model_dim(spec.model)
    for head_name, head in spec.scores.heads().items():
        # A local safetensors file says its width; a hub head is the published one (768 wide); a local
        # .pth cannot be read without torch here: the worker checks it when it loads it.
        width = head_width(head) or (HEAD_WIDTH if head.name else None)
        if dim is not None and width is not None:
            check_head_width(f"spec.scores.{head_name}", width, dim)
    out = _norm(spec.output.uri)
    inputs = [spec.input.uri] if spec.input.uri else list(spec.input.shards)
    for idx, src in enumerate(inputs):
        field_name = "spec.input.uri" if spec.input.uri else f"spec.input.shards[{idx}]"
        base = src.split("{", 1)[0]
        if not base.lower().endswith(".tar"):
            base = _norm(base)
        if out.startswith(base if base.endswith("/") else base + "/") or _norm(base) == out:
            raise SpecError("spec.output.uri", f"must not be inside the input ({field_name} = {src!r})")
        if base.endswith("/") and base.startswith(out):
            raise SpecError("spec.output.uri", f"must not contain the input ({field_name} = {src!r})")


def parse_job(doc: Any, allow_local: bool = True, base_dir: Path | None = None) -> Job:
    """Validate a whole EmbeddingJob document (apiVersion, kind, metadata, spec)."""
    doc = _mapping(doc, "document")
    api_version = doc.get("apiVersion")
    if api_version != f"{API_GROUP}/{API_VERSION}":
        raise SpecError("apiVersion", f"must be {API_GROUP}/{API_VERSION}, got {api_version!r}")
    if doc.get("kind") != KIND:
        raise SpecError("kind", f"must be {KIND}, got {doc.get('kind')!r}")
    meta = _mapping(doc.get("metadata"), "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not DNS_NAME.match(name) or len(name) > 253:
        raise SpecError("metadata.name", f"must be a DNS-1123 name, got {name!r}")
    namespace = meta.get("namespace") or "default"
    if "spec" not in doc:
        raise SpecError("spec", "is required")
    return Job(name=name, namespace=namespace, spec=parse_spec(doc["spec"], allow_local, base_dir))


def load_job_file(path: str | Path) -> Job:
    """Read and validate a job YAML file for ``embedjob run``. Relative local paths in it are
    resolved against the file's folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError("file", f"cannot read {p}: {e.strerror or e}") from e
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SpecError("file", f"{p} is not valid YAML: {e}") from e
    if len(docs) != 1:
        raise SpecError("file", f"{p} must hold exactly one EmbeddingJob document, found {len(docs)}")
    return parse_job(docs[0], allow_local=True, base_dir=p.resolve().parent)
