"""Shard planning: turn a job's input into the ordered list of shards and their output stems.

Input forms: a prefix (``s3://b/laion/`` or a local folder; every ``.tar`` under it, recursively,
via paginated listing), a brace pattern (``s3://b/laion/{00000..00099}.tar``, also ``{a,b}``),
one ``.tar``, or an explicit ``shards`` list.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass

from embedjob.layout import SHARD_SUFFIX, shard_stem
from embedjob.spec import InputSpec, SpecError
from embedjob.storage import Storage

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")


class PlanError(SpecError):
    """The input cannot be planned (nothing matches, bad pattern, ...). ``field`` names the spec field."""


@dataclass(frozen=True)
class Shard:
    uri: str
    stem: str


def _alternatives(body: str) -> list[str]:
    m = _RANGE.match(body)
    if m:
        a, b, step = m.group(1), m.group(2), int(m.group(3) or 1)
        width = max(len(a.lstrip("-")), len(b.lstrip("-"))) if (a.lstrip("-").startswith("0") or
                                                                   b.lstrip("-").startswith("0")) else 0
        lo, hi = int(a), int(b)
        rng = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [str(n).zfill(width) if width else str(n) for n in rng]
    if "," in body:
        return body.split(",")
    raise PlanError("spec.input.uri", f"cannot expand {{{body}}}: use {{000..099}} or {{a,b,c}}")


def expand_braces(pattern: str) -> list[str]:
    """Expand every ``{..}`` group, left to right, like the shell (and webdataset's braceexpand) do."""
    parts = _BRACE.split(pattern)
    literals, groups = parts[0::2], parts[1::2]
    choices = [_alternatives(g) for g in groups]
    out = []
    for combo in itertools.product(*choices):
        s = literals[0]
        for alt, lit in zip(combo, literals[1:], strict=True):
            s += alt + lit
        out.append(s)
    return out


def input_root(spec: InputSpec) -> str:
    """The folder stems are relative to: the prefix, the part of a pattern before its first brace
    (cut at the last slash), or the common folder of an explicit list."""
    if spec.uri:
        uri = spec.uri
        if "{" in uri:
            return uri.split("{", 1)[0].rsplit("/", 1)[0]
        if uri.lower().endswith(SHARD_SUFFIX):
            return uri.rsplit("/", 1)[0]
        return uri.rstrip("/")
    dirs = [s.rsplit("/", 1)[0] for s in spec.shards]
    common = os.path.commonprefix([d + "/" for d in dirs])
    return common.rsplit("/", 1)[0] if "/" in common else ""


def plan_shards(spec: InputSpec, storage: Storage) -> list[Shard]:
    """The job's shards, in order, with their stems. Raises :class:`PlanError` when nothing matches."""
    root = input_root(spec)
    if spec.shards:
        uris = list(spec.shards)
        field = "spec.input.shards"
    elif "{" in (spec.uri or ""):
        uris = expand_braces(spec.uri)
        field = "spec.input.uri"
        if not uris:
            raise PlanError(field, f"pattern {spec.uri!r} expands to no shards")
    elif spec.uri.lower().endswith(SHARD_SUFFIX):
        uris = [spec.uri]
        field = "spec.input.uri"
    else:
        field = "spec.input.uri"
        uris = list(storage.list(spec.uri.rstrip("/") + "/", suffix=SHARD_SUFFIX))
        if not uris:
            raise PlanError(field, f"no .tar shards found under {spec.uri!r}")
    shards = [Shard(uri=u, stem=shard_stem(u, root)) for u in uris]
    stems = [s.stem for s in shards]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise PlanError(field, f"two shards map to the same output stem {dup!r}")
    return shards
