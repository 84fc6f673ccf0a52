"""SigLIP's caption tokenizer, as the SigLIP text towers were trained with it: Hugging Face's
``SiglipTokenizer`` built from the checkpoint's own files (``spiece.model``, ``tokenizer_config.json``,
``special_tokens_map.json``), never ``AutoTokenizer`` and never ``trust_remote_code``.

The caption is canonicalised as ``SiglipTokenizer`` does (lower-cased when the config says
``do_lower_case``, ASCII punctuation removed, whitespace collapsed and stripped), split by the
SentencePiece model, and ended with ``</s>``; a caption longer than the context is cut to
``context_length - 1`` pieces + ``</s>`` (as ``truncation=True`` does). SigLIP's text tower pools the
LAST position, so every caption is padded to exactly the context length it was trained at (the text
config's ``max_position_embeddings``, 64 for the google checkpoints) with the pad id
(``padding="max_length"``): :class:`~embedjob.worker.model.text.TextEmbedder` pads to
``context_length`` when ``pad_to_context`` is set.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from embedjob.worker.model.tokenizer import Tokens

TOKENIZER_ID = "siglip-sentencepiece"
VOCAB_FILE = "spiece.model"
# What a SigLIP checkpoint's tokenizer is made of (the hub's files); fetched with the weights.
TOKENIZER_FILES = (VOCAB_FILE, "tokenizer_config.json", "special_tokens_map.json")


class SiglipCaptionTokenizer:
    """``tokenize(caption)`` -> :class:`Tokens` of at most ``context_length`` ids, ``</s>`` last, unpadded
    (the text embedder pads to ``context_length`` with ``pad_id``)."""

    pad_to_context = True  # SigLIP pools the last position: padded exactly as trained

    def __init__(self, hf_tokenizer: Any, context_length: int) -> None:
        self._hf = hf_tokenizer
        self.context_length = int(context_length)
        self.vocab_size = int(hf_tokenizer.vocab_size)
        self.eos_id = int(hf_tokenizer.eos_token_id)
        self.pad_id = int(hf_tokenizer.pad_token_id)
        self.do_lower_case = bool(getattr(hf_tokenizer, "do_lower_case", True))
        vocab = Path(hf_tokenizer.vocab_file)
        self.vocab_sha256 = hashlib.sha256(vocab.read_bytes()).hexdigest()

    @classmethod
    def from_checkpoint(cls, source: str, context_length: int, *, revision: str | None = None,
                        cache_dir: str | None = None, local_only: bool = False) -> SiglipCaptionTokenizer:
        """The tokenizer of the checkpoint at ``source`` (a folder or a hub id) from its own files."""
        from transformers import SiglipTokenizer

        hf = SiglipTokenizer.from_pretrained(source, revision=revision, cache_dir=cache_dir,
                                             local_files_only=local_only)
        return cls(hf, context_length)

    def identity(self) -> dict[str, Any]:
        """What a manifest records: which tokenizer, which SentencePiece model, how it cleans, cuts and pads."""
        import transformers

        return {"id": TOKENIZER_ID, "implementation": f"transformers {transformers.__version__} SiglipTokenizer",
                "vocab": VOCAB_FILE, "vocabSha256": self.vocab_sha256, "vocabSize": self.vocab_size,
                "contextLength": self.context_length, "padding": "max_length", "padId": self.pad_id,
                "eosId": self.eos_id,
                "clean": ("lower-cased, " if self.do_lower_case else "")
                + "punctuation removed, whitespace collapsed (SiglipTokenizer.canonicalize_text)"}

    def tokenize(self, caption: str) -> Tokens:
        """The caption's pieces + ``</s>``, cut to the context length with ``</s>`` last."""
        ids = [int(i) for i in self._hf.convert_tokens_to_ids(self._hf.tokenize(caption))]
        body_max = self.context_length - 1
        if len(ids) > body_max:
            return Tokens(ids[:body_max] + [self.eos_id], truncated=True)
        return Tokens(ids + [self.eos_id], truncated=False)
