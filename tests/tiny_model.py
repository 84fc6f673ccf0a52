"""The tests' tiny random-weight CLIP: the same one the offline demo uses."""

from __future__ import annotations

from pathlib import Path

from embedjob.worker.random_model import save_random_clip


def save_tiny_clip(path: Path, seed: int = 0, projection_dim: int = 32) -> Path:
    return save_random_clip(path, seed=seed, projection_dim=projection_dim)
