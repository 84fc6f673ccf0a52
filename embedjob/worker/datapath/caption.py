"""A sample's caption, for text outputs: its ``.txt`` member, or one field of its ``.json`` sidecar.

No caption is ``None`` (the sample gets a zero text row and ``has_caption = false``): no ``.txt``, a
caption that is empty or only whitespace, a ``.json`` that does not parse (nested too deep included),
is not an object, lacks the field or holds something other than a string there. Bytes that are not
UTF-8 were already replaced (U+FFFD) by the tar reader; such a caption is embedded as it reads.
"""

from __future__ import annotations

import json

from embedjob.worker.datapath.write import MetadataRow


def caption_of(row: MetadataRow, json_field: str | None = None) -> str | None:
    """The caption to embed for ``row``: ``row.caption`` (the ``.txt``), or ``json_field`` of ``row.json``."""
    text = row.caption
    if json_field is not None:
        try:
            doc = json.loads(row.json) if row.json is not None else None
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth (1 MiB of "[")
            doc = None
        text = doc.get(json_field) if isinstance(doc, dict) else None
    if not isinstance(text, str) or not text.strip():
        return None
    return text


def caption_source(json_field: str | None) -> str:
    """How the manifest names where captions came from."""
    return f"json:{json_field}" if json_field is not None else "txt"
