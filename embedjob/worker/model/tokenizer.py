"""OpenAI CLIP's caption tokenizer, as the CLIP text towers were trained with it. Torch-free.

The same steps as OpenAI's ``clip/simple_tokenizer.py`` (and open_clip's ``SimpleTokenizer``, the test
reference): ``ftfy.fix_text``, HTML unescaped twice, whitespace collapsed and stripped, lower-cased, split
by the CLIP pattern, byte-level BPE with the real merges (``bpe_simple_vocab_16e6.txt.gz``, vendored as
package data: see LICENSE-clip-bpe-vocab.txt), then ``<|startoftext|>`` … ``<|endoftext|>`` cut to the
context length with the last token ``<|endoftext|>``. Hugging Face's ``CLIPTokenizer`` and
``CLIPTokenizerFast`` differ on HTML entities and mojibake, which web captions are full of.

A caption that spells a special token (``<|endoftext|>``) is tokenized as text, as open_clip does: a
caption must never move the end-of-text position the text tower pools at.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import heapq
import html
from dataclasses import dataclass
from importlib import resources
from typing import Any

import ftfy
import regex

BPE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_ID = "openai-clip-bpe-49408"
# Distinct pieces (words) whose BPE is kept: a long-lived worker sees an unbounded number of them.
BPE_CACHE_SIZE = 1 << 16
BPE_CACHED_PIECE_MAX = 64  # characters: the cache then holds at most ~8 MB of keys
_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map of the 256 bytes to printable characters (the BPE works on those)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _plain(text: str) -> bool:
    """Printable ASCII (spaces included, no other whitespace or control character)."""
    return text.isascii() and text.isprintable()


def clean_caption(text: str) -> str:
    """ftfy, HTML unescaped twice, whitespace collapsed, lower-cased (OpenAI's basic + whitespace clean).
    Printable ASCII without ``&`` is left as it is by ftfy (its fixes need non-ASCII characters, control
    characters, line breaks or an entity) and by unescaping: the common caption skips both (tested
    against ftfy)."""
    if not (_plain(text) and "&" not in text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


@dataclass(frozen=True)
class Tokens:
    """One caption's ids, ``<|startoftext|>`` first and ``<|endoftext|>`` last (no padding)."""

    ids: list[int]
    truncated: bool  # the caption had more tokens than the context length holds


class ClipTokenizer:
    """OpenAI CLIP's tokenizer: ``tokenize(caption)`` -> :class:`Tokens` of at most ``context_length`` ids."""

    def __init__(self, context_length: int = CONTEXT_LENGTH) -> None:
        raw = resources.files("embedjob.worker.model").joinpath(BPE_VOCAB).read_bytes()
        self.vocab_sha256 = hashlib.sha256(raw).hexdigest()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        byte_chars = list(_bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self._ranks = {m: i for i, m in enumerate(merges)}
        self._byte_chars = _bytes_to_unicode()
        self.context_length = context_length
        self.pad_id = 0  # rows pad with zeros after <|endoftext|> (open_clip's tokenize)
        self.pad_to_context = False  # the causal tower ignores what follows <|endoftext|>
        self._bpe_cached = functools.lru_cache(maxsize=BPE_CACHE_SIZE)(self._bpe_uncached)

    def identity(self) -> dict[str, Any]:
        """What a manifest records: which tokenizer, which merges, how it cleans and cuts."""
        return {"id": TOKENIZER_ID, "implementation": "embedjob.worker.model.tokenizer (OpenAI CLIP simple_tokenizer)",
                "vocab": BPE_VOCAB, "vocabSha256": self.vocab_sha256, "vocabSize": self.vocab_size,
                "contextLength": self.context_length, "ftfy": ftfy.__version__,
                "clean": "ftfy.fix_text, html.unescape x2, whitespace collapsed, lower-cased"}

    def _bpe_uncached(self, piece: str) -> tuple[int, ...]:
        """Byte-level BPE: the lowest-ranked adjacent pair is merged, everywhere, until no pair is ranked.

        OpenAI's loop rescans the whole word for every merge: O(n²) in its length, so one 100 kB caption
        word of random letters took 99 s, and a 1 MiB one (what the sidecar limit admits) hours. Here the
        pairs wait in a heap ordered by (rank, position) over a linked list of symbols: O(n log n), and the
        same merges in the same order. That holds because in CLIP's merges every token is made by one merge
        and a pair is ranked after the merges that make its parts (tested over the whole file): a merge
        creates only pairs of higher rank, so the ranks are taken in rising order, and within one rank from
        left to right, as OpenAI's passes take them."""
        symbols: list[str] = list(piece[:-1]) + [piece[-1] + "</w>"]
        n = len(symbols)
        if n > 1:
            ranks = self._ranks
            nxt = list(range(1, n + 1))  # n: none
            prev = list(range(-1, n - 1))  # -1: none
            heap = [(r, i) for i in range(n - 1) if (r := ranks.get((symbols[i], symbols[i + 1]))) is not None]
            heapq.heapify(heap)
            while heap:
                rank, i = heapq.heappop(heap)
                j = nxt[i]
                # a rank names one pair: the entry is stale if i was absorbed or the pair at i has changed
                if not symbols[i] or j >= n or ranks.get((symbols[i], symbols[j])) != rank:
                    continue
                symbols[i] += symbols[j]
                symbols[j] = ""
                nxt[i] = k = nxt[j]
                if k < n:
                    prev[k] = i
                for left, right in ((prev[i], i), (i, k)):
                    if left >= 0 and right < n and (r := ranks.get((symbols[left], symbols[right]))) is not None:
                        heapq.heappush(heap, (r, left))
            symbols = [s for s in symbols if s]
        return tuple(self.encoder[s] for s in symbols)

    def tokenize(self, caption: str) -> Tokens:
        """``<|startoftext|>`` + BPE of the cleaned caption + ``<|endoftext|>``, cut to the context length
        with ``<|endoftext|>`` last. Stops reading a long caption once it is known to be cut."""
        body_max = self.context_length - 2
        ids: list[int] = [self.sot_id]
        text = clean_caption(caption)
        plain = _plain(text)  # its pieces ('!'..'~') are their own byte characters
        for match in _PATTERN.finditer(text):
            piece = match.group()
            if not plain:
                piece = "".join(self._byte_chars[b] for b in piece.encode("utf-8"))
            # a short piece's ids are kept; a long one is rare, and as a cache key would hold its whole text
            ids.extend(self._bpe_cached(piece) if len(piece) <= BPE_CACHED_PIECE_MAX else self._bpe_uncached(piece))
            if len(ids) - 1 > body_max:
                return Tokens(ids[: self.context_length - 1] + [self.eot_id], truncated=True)
        return Tokens(ids + [self.eot_id], truncated=False)


@functools.cache
def clip_tokenizer(context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
    """The tokenizer, built once per process (reading the merges takes ~0.2 s)."""
    return ClipTokenizer(context_length)
