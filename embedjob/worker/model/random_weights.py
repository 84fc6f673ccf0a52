"""A small CLIP with random weights, saved exactly like the hub checkpoint (save_pretrained,
safetensors). Used by the tests and by the offline demo, where ViT-L/14 weights cannot be fetched.
Its embeddings carry no meaning; its folder name says so."""

from __future__ import annotations

from pathlib import Path

RANDOM_MODEL_DIRNAME = "RANDOM-WEIGHTS-tiny-clip"


def save_random_clip(path: str | Path, seed: int = 0, projection_dim: int = 32) -> Path:
    """The tiny CLIP of the tests and the demo (its text tower a toy one of 1,000 ids)."""
    return _save_tiny_clip(path, seed, projection_dim, {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 1000, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1})


def _save_tiny_clip(path: str | Path, seed: int, projection_dim: int, text_config: dict) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=text_config,
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 224, "patch_size": 14},
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


RANDOM_VIT_L14_DIRNAME = "RANDOM-WEIGHTS-vit-l14-shape"
# openai/clip-vit-large-patch14's vision tower: what the benchmark needs for the real compute cost.
VIT_L14_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                  "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"}


# openai/clip-vit-large-patch14's text tower (the real tokenizer's ids).
VIT_L14_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
                "pad_token_id": 1, "hidden_act": "quick_gelu"}


def save_random_vit_l14(path: str | Path, seed: int = 0, text: bool = False) -> Path:
    """A CLIP with ViT-L/14's vision tower (projection 768) and random weights; the text tower is
    a tiny stand-in, or with ``text`` ViT-L/14's own text tower (for caption outputs). Saved like the
    hub checkpoint, so it loads through the same code as the real model and costs the same to run
    (about 162 GFLOP per image)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(VIT_L14_TEXT) if text else {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 1000, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1},
        vision_config=dict(VIT_L14_VISION),
        projection_dim=768,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


RANDOM_HEADS_DIRNAME = "RANDOM-WEIGHTS-score-heads"


def save_random_heads(path: str | Path, seed: int = 0, width: int = 768) -> dict[str, Path]:
    """Both score heads with random weights in their real shapes, saved as their weights are
    published: the aesthetic predictor as a ``.pth`` state dict with its original keys, the NSFW
    detector as safetensors with the keys of its torch conversion (embedjob.worker.model.heads).
    Returns score -> file."""
    import torch
    from safetensors.torch import save_file

    from embedjob.worker.model.heads import AestheticMLP, NsfwDetector

    torch.manual_seed(seed)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    aesthetic = AestheticMLP(width)
    nsfw = NsfwDetector(width)
    with torch.no_grad():  # a Normalization layer as fitted: some mean, some spread
        nsfw.norm.mean.normal_(0.0, 0.02)
        nsfw.norm.variance.uniform_(0.5e-3, 2e-3)
    files = {"aesthetic": folder / "aesthetic-vit-l14.pth", "nsfw": folder / "nsfw-vit-l14.safetensors"}
    torch.save(aesthetic.state_dict(), files["aesthetic"])
    save_file({k: v.contiguous() for k, v in nsfw.state_dict().items()}, str(files["nsfw"]))
    return files


RANDOM_TEXT_MODEL_DIRNAME = "RANDOM-WEIGHTS-tiny-clip-text"
# The text tower's shape keys of every OpenAI/LAION CLIP (the real tokenizer's 49408 ids, 77 positions,
# <|endoftext|> = 49407) at a tiny width.
CLIP_TEXT_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                  "eos_token_id": 49407, "pad_token_id": 1, "hidden_act": "quick_gelu"}


def save_random_text_clip(path: str | Path, seed: int = 0, projection_dim: int = 32) -> Path:
    """A tiny CLIP whose text tower takes the real tokenizer's ids (for text outputs), random weights."""
    return _save_tiny_clip(path, seed, projection_dim, dict(CLIP_TEXT_TINY))


# Random-weight checkpoints in the shapes of the families embedjob loads by name (small widths, the same
# config keys and image geometry as the hub's), each with the hub's own preprocessor_config.json.
SHAPES: dict[str, dict] = {
    "vit-b-32": {"family": "clip", "image_size": 224, "patch_size": 32},
    "vit-l-14-336": {"family": "clip", "image_size": 336, "patch_size": 14},
    "siglip-b-16": {"family": "siglip", "image_size": 224, "patch_size": 16},
}
SMALL_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def clip_processor_config(size: int) -> dict:
    """openai/clip-vit-*'s preprocessor_config.json (the 336 px one differs only in its sizes)."""
    return {"crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": size}


def siglip_processor_config(size: int) -> dict:
    """google/siglip-base-patch16-224's preprocessor_config.json."""
    return {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
            "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
            "size": {"height": size, "width": size}}


def save_random_shape(path: str | Path, shape: str, seed: int = 0) -> Path:
    """A random-weight checkpoint in the shape ``shape`` (SHAPES), saved like the hub's: config.json,
    model.safetensors and preprocessor_config.json. CLIP shapes have a text tower that takes OpenAI
    CLIP's token ids (for text outputs); SigLIP shapes hold their own SentencePiece tokenizer
    (:func:`save_siglip_tokenizer`, a real one trained locally) that fits their text tower."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    spec = SHAPES[shape]
    torch.manual_seed(seed)
    vision = {**SMALL_VISION, "image_size": spec["image_size"], "patch_size": spec["patch_size"]}
    if spec["family"] == "clip":
        model = CLIPModel(CLIPConfig(text_config=dict(CLIP_TEXT_TINY), vision_config=vision, projection_dim=32))
        processor = clip_processor_config(spec["image_size"])
    else:
        text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": SIGLIP_TINY_VOCAB, "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": None,
                "eos_token_id": 1}
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = siglip_processor_config(spec["image_size"])
    model.eval().save_pretrained(path, safe_serialization=True)
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    if spec["family"] == "siglip":
        save_siglip_tokenizer(path, SIGLIP_TINY_VOCAB, max_length=64)
    return Path(path)


SIGLIP_TINY_VOCAB = 1000
_WORDS = ("a photo of the cat dog on in with and at red blue green small large old new house car tree "
          "beach sunset city street woman man child people two three white black yellow running sitting "
          "standing near under over by for from water sky mountain river flower garden food plate table "
          "room window door road night day summer winter snow rain light dark painting drawing logo text "
          "shirt dress shoes bag wedding party birthday cake coffee book phone computer game player team "
          "été café naïve über straße 東京 写真 猫").split()


def _tokenizer_corpus(seed: int, lines: int = 1500) -> list[str]:
    """Caption-like lines (words and random syllables, numbers, punctuation): enough distinct pieces for
    a SentencePiece model of SIGLIP_TINY_VOCAB pieces."""
    import random

    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) if rng.random() < 0.6 else
                 "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 2030)))
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "", ","]))
    return out


def save_siglip_tokenizer(path: str | Path, vocab_size: int, max_length: int = 64, seed: int = 0) -> Path:
    """A real SentencePiece unigram model of ``vocab_size`` pieces, trained here on a synthetic caption
    corpus, saved as a SigLIP checkpoint on the hub holds its tokenizer: ``spiece.model`` (``<pad>`` 0,
    ``</s>`` 1, ``<unk>`` 2, no BOS), ``tokenizer_config.json`` (SiglipTokenizer, lower-cased,
    ``model_max_length``) and ``special_tokens_map.json`` (pad = eos = ``</s>``). Returns spiece.model."""
    import io
    import json

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus(seed)), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2, hard_vocab_limit=True)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    specials = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **specials, "additional_special_tokens": [], "do_lower_case": True, "model_max_length": max_length,
        "sp_model_kwargs": {}, "tokenizer_class": "SiglipTokenizer"}, indent=2))
    return folder / "spiece.model"
