"""Shard planning: turn a job's input into the ordered list of shards and their output stems.

Input forms: a prefix (``s3://b/laion/`` or a local folder; every ``.tar`` under it, recursively,
via paginated listing), a brace pattern (``s3://b/laion/{00000..00099}.tar``, also ``{a,b}``),
one ``.tar``, or an explicit ``shards`` list.

Planning is bounded: a plan holds at most ``max_shards`` shards (``EMBEDJOB_MAX_SHARDS``, default
1,000,000). A brace pattern's combinations are counted before anything is expanded, and a listing
stops one key past the cap, so a hostile spec costs the operator neither time nor memory. Every
shard URI and stem is checked again after expansion and listing (embedjob.uris): a pattern
alternative or a listed key with a ``..`` segment is refused, never turned into an output key.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass

from embedjob import uris
from embedjob.layout import SHARD_SUFFIX, shard_stem
from embedjob.spec import InputSpec, SpecError
from embedjob.storage import Storage

DEFAULT_MAX_SHARDS = 1_000_000

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")


class PlanError(SpecError):
    """The input cannot be planned (nothing matches, bad pattern, ...). ``field`` names the spec field."""


@dataclass(frozen=True)
class Shard:
    uri: str
    stem: str


def _range(body: str) -> range | None:
    m = _RANGE.match(body)
    if not m:
        return None
    step = int(m.group(3) or 1)
    if step < 1:
        raise PlanError("spec.input.uri", f"cannot expand {{{body}}}: the step must be at least 1")
    lo, hi = int(m.group(1)), int(m.group(2))
    return range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)


def _count(body: str) -> int:
    """How many alternatives ``{body}`` has, without making them."""
    rng = _range(body)
    if rng is not None:  # len() overflows past sys.maxsize: count with integers
        span = abs(rng.stop - rng.start)
        return (span + abs(rng.step) - 1) // abs(rng.step)
    if "," in body:
        return body.count(",") + 1
    raise PlanError("spec.input.uri", f"cannot expand {{{body}}}: use {{000..099}} or {{a,b,c}}")


def count_braces(pattern: str) -> int:
    """How many names ``pattern`` expands to: the product of every group's count, computed without
    expanding anything (``{0..999999999}/{0..999999999}`` costs microseconds)."""
    total = 1
    for group in _BRACE.split(pattern)[1::2]:
        total *= _count(group)
    return total


def _alternatives(body: str) -> list[str]:
    rng = _range(body)
    if rng is not None:
        m = _RANGE.match(body)
        assert m is not None
        a, b = m.group(1), m.group(2)
        width = max(len(a.lstrip("-")), len(b.lstrip("-"))) if (a.lstrip("-").startswith("0") or
                                                                   b.lstrip("-").startswith("0")) else 0
        return [str(n).zfill(width) if width else str(n) for n in rng]
    if "," in body:
        return body.split(",")
    raise PlanError("spec.input.uri", f"cannot expand {{{body}}}: use {{000..099}} or {{a,b,c}}")


def expand_braces(pattern: str, max_shards: int = DEFAULT_MAX_SHARDS) -> list[str]:
    """Expand every ``{..}`` group, left to right, like the shell (and webdataset's braceexpand) do.
    Raises :class:`PlanError` before expanding anything when there would be more than ``max_shards``."""
    n = count_braces(pattern)
    if n > max_shards:
        raise PlanError("spec.input.uri", f"pattern {pattern!r} expands to {n:,} shards, more than the "
                                          f"{max_shards:,} a job may have (EMBEDJOB_MAX_SHARDS)")
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


def plan_shards(spec: InputSpec, storage: Storage, max_shards: int = DEFAULT_MAX_SHARDS) -> list[Shard]:
    """The job's shards, in order, with their stems. Raises :class:`PlanError` naming the field when
    nothing matches, when there are more than ``max_shards``, or when a shard's URI or stem is unsafe
    (embedjob.uris)."""
    root = input_root(spec)
    too_many = f"more than the {max_shards:,} shards a job may have (EMBEDJOB_MAX_SHARDS)"
    if spec.shards:
        found = list(spec.shards)
        field = "spec.input.shards"
        if len(found) > max_shards:
            raise PlanError(field, f"lists {len(found):,} shards, {too_many}")
    elif "{" in (spec.uri or ""):
        found = expand_braces(spec.uri, max_shards)
        field = "spec.input.uri"
        if not found:
            raise PlanError(field, f"pattern {spec.uri!r} expands to no shards")
    elif spec.uri.lower().endswith(SHARD_SUFFIX):
        found = [spec.uri]
        field = "spec.input.uri"
    else:
        field = "spec.input.uri"
        found = list(itertools.islice(storage.list(spec.uri.rstrip("/") + "/", suffix=SHARD_SUFFIX), max_shards + 1))
        if len(found) > max_shards:
            raise PlanError(field, f"{spec.uri!r} holds {too_many} (listing stopped there)")
        if not found:
            raise PlanError(field, f"no .tar shards found under {spec.uri!r}")
    shards = []
    for u in found:
        try:
            uris.check_uri(u)
            stem = uris.check_stem(shard_stem(u, root))
        except (uris.UnsafeURI, ValueError) as e:
            raise PlanError(field, f"shard {u!r} refused: {e}") from e
        shards.append(Shard(uri=u, stem=stem))
    seen: set[str] = set()
    for s in shards:
        if s.stem in seen:
            raise PlanError(field, f"two shards map to the same output stem {s.stem!r}")
        seen.add(s.stem)
    return shards
