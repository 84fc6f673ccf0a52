"""Stage 4, the model: ``torch_env`` (torch, imported once with its thread policy), ``load`` (which
checkpoint, loading and the per-process cache), ``embedder`` (the loaded vision tower: batching,
out-of-memory back-off, compiled forwards), ``transform`` (the pixels the checkpoint wants, from its
processor config), ``text`` and ``tokenizer`` (the text tower), ``heads`` (score heads).
``random_weights`` saves test checkpoints. Imports nothing of the data path or the runtime."""


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as asked (bad checkpoint, unsupported device/precision)."""
