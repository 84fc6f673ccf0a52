"""A small CLIP with random weights, saved exactly like the hub checkpoint (save_pretrained,
safetensors). Used by the tests and by the offline demo, where ViT-L/14 weights cannot be fetched.
Its embeddings carry no meaning; its folder name says so."""

from __future__ import annotations

from pathlib import Path

RANDOM_MODEL_DIRNAME = "RANDOM-WEIGHTS-tiny-clip"


def save_random_clip(path: str | Path, seed: int = 0, projection_dim: int = 32) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 1000, "max_position_embeddings": 77,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 224, "patch_size": 14},
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)
