"""URI hygiene: what a location or an output stem may look like. Torch-free.

One rule for every place a location enters the system: the spec (``embedjob.spec``), a brace
pattern after expansion and a prefix after listing (``embedjob.planning``), the output stems made from
them, and every task message a worker takes (``embedjob.access``).

- ``s3://bucket/key`` is S3; anything else without a scheme is a local path; any other scheme
  (``http://``, ``file://``, ``S3://``, ``gs:``...) is refused, never opened as a local path.
- No ``.`` or ``..`` segment, and (in S3 keys) no empty segment: ``s3://b/a/../b/x.tar`` and
  ``s3://b/a//x.tar`` name literal keys on AWS, but a normalising proxy or a local file system would
  resolve them somewhere else. A trailing ``/`` (a prefix) is fine.
- No control or format characters (newlines, NUL, bidirectional overrides...): they hide in logs,
  events and keys.
"""

from __future__ import annotations

import re
import unicodedata

S3_SCHEME = "s3://"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
# Unicode categories refused anywhere in a location or a stem: control, format, line/paragraph separators.
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


class UnsafeURI(ValueError):
    """A location or stem that breaks a hygiene rule; the message says which."""


def scheme_of(uri: str) -> str:
    """``"s3"`` for S3, ``""`` for a local path; raises :class:`UnsafeURI` for any other scheme (a
    Windows drive letter such as ``C:`` is not a scheme here either: refused)."""
    if uri.startswith(S3_SCHEME):
        return "s3"
    m = _SCHEME.match(uri)
    if m:
        raise UnsafeURI(f"unsupported scheme {m.group(0)!r} in {uri!r}: use s3:// or a local path")
    return ""


def bad_character(text: str) -> str | None:
    """The first control / format character in ``text`` (as ``U+XXXX``), or None."""
    for ch in text:
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            return f"U+{ord(ch):04X}"
    return None


def _check_segments(path: str, what: str, uri: str, allow_empty: bool) -> None:
    segments = path.split("/")
    if segments and segments[-1] == "":  # a trailing slash: a prefix (folder)
        segments = segments[:-1]
    for seg in segments:
        if seg in (".", ".."):
            raise UnsafeURI(f"{what} {uri!r} has a {seg!r} segment")
        if seg == "" and not allow_empty:
            raise UnsafeURI(f"{what} {uri!r} has an empty segment ('//')")


def check_uri(uri: str) -> str:
    """Raise :class:`UnsafeURI` unless ``uri`` is a clean ``s3://`` URI or local path. Returns it."""
    if not isinstance(uri, str) or not uri:
        raise UnsafeURI(f"expected a non-empty location, got {uri!r}")
    bad = bad_character(uri)
    if bad:
        raise UnsafeURI(f"{uri!r} contains the control character {bad}")
    if scheme_of(uri) == "s3":
        _bucket, _, key = uri[len(S3_SCHEME):].partition("/")
        if key:
            _check_segments(key, "S3 URI", uri, allow_empty=False)
        return uri
    # Local: empty segments are harmless (the OS collapses them), . and .. are not.
    _check_segments(uri.lstrip("/"), "path", uri, allow_empty=True)
    return uri


def check_stem(stem: str) -> str:
    """Raise :class:`UnsafeURI` unless ``stem`` is a relative path of clean segments (it becomes part of
    every output key of its shard). Returns it."""
    if not isinstance(stem, str) or not stem:
        raise UnsafeURI(f"expected a non-empty output stem, got {stem!r}")
    bad = bad_character(stem)
    if bad:
        raise UnsafeURI(f"output stem {stem!r} contains the control character {bad}")
    if stem.startswith("/") or stem.endswith("/") or "\\" in stem:
        raise UnsafeURI(f"output stem {stem!r} must be a relative path of segments")
    _check_segments(stem, "output stem", stem, allow_empty=False)
    return stem
