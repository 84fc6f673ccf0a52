"""The loaded text tower: :class:`TextEmbedder` maps captions to L2-normalised rows, batched.

It is the text tower and projection of the same checkpoint as the image embedder (loaded beside it
by :func:`embedjob.worker.model.load.load_or_reuse` for a job with ``spec.outputs: [image, text]``),
on the same device, in the same precision, and it takes the image embedder's lock for each batch: on
one device, a text batch and an image batch never run at once (no fight for the CPU's cores or
the GPU's memory). Captions are tokenized by the family's own tokenizer (a :class:`CaptionTokenizer`):
OpenAI CLIP's (:mod:`embedjob.worker.model.tokenizer`; padded to the batch's longest caption, which the
causal CLIP tower ignores) or SigLIP's SentencePiece one (:mod:`embedjob.worker.model.siglip_tokenizer`;
padded to the full context length, since SigLIP pools the last position).

A sample without a caption (``None``) gets a zero row; the caller records ``has_caption = false``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from embedjob.worker.model.tokenizer import Tokens
from embedjob.worker.model.torch_env import torch


@dataclass
class TextRows:
    """One batch of captions embedded: ``rows[i]`` is caption i's unit row (zeros without a caption)."""

    rows: np.ndarray  # float32 [n, dim]
    has_caption: np.ndarray  # bool [n]
    truncated: int  # captions cut to the context length


class CaptionTokenizer(Protocol):
    """What the text embedder needs of a family's tokenizer."""

    context_length: int
    vocab_size: int
    pad_id: int  # the id that fills a row after a caption's last token
    pad_to_context: bool  # pad every row to context_length (the tower pools a fixed position)

    def tokenize(self, caption: str) -> Tokens: ...

    def identity(self) -> dict[str, Any]: ...


class TextEmbedder:
    """A loaded text tower. ``forward`` maps padded ids ``[B, L]`` (on the device) to unnormalised
    ``[B, dim]`` embeddings; rows come back float32 and L2-normalised in fp32."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *, tokenizer: CaptionTokenizer, dim: int,
                 device: torch.device, lock: threading.Lock, batch_size: int = 256) -> None:
        self._forward = forward
        self.tokenizer = tokenizer
        self.dim = dim
        self.device = device
        self._lock = lock
        self.batch_size = batch_size
        self.busy_seconds = 0.0  # time spent in the tower (tokenizing excluded)

    def embed(self, captions: Sequence[str | None]) -> TextRows:
        """Embed ``captions`` in order; ``None`` is no caption (a zero row)."""
        n = len(captions)
        rows = np.zeros((n, self.dim), dtype=np.float32)
        has = np.array([c is not None for c in captions], dtype=bool)
        tokens = {i: self.tokenizer.tokenize(c) for i, c in enumerate(captions) if c is not None}
        order = sorted(tokens, key=lambda i: len(tokens[i].ids))  # similar lengths pad little
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            # CLIP: padding after <|endoftext|> cannot change its row (the tower is causal), so a batch
            # pads to its longest caption. SigLIP: every row padded to the context, as trained.
            width = (self.tokenizer.context_length if self.tokenizer.pad_to_context
                     else max(len(tokens[i].ids) for i in chunk))
            ids = np.full((len(chunk), width), self.tokenizer.pad_id, dtype=np.int64)
            for j, i in enumerate(chunk):
                ids[j, : len(tokens[i].ids)] = tokens[i].ids
            rows[chunk] = self._run(torch.from_numpy(ids))
        return TextRows(rows=rows, has_caption=has, truncated=sum(t.truncated for t in tokens.values()))

    def _run(self, ids: torch.Tensor) -> np.ndarray:
        with self._lock, torch.inference_mode():
            t = time.perf_counter()
            emb = self._forward(ids.to(self.device))
            out = torch.nn.functional.normalize(emb.to(torch.float32), dim=-1).cpu().numpy()
            self.busy_seconds += time.perf_counter() - t
        return out
