"""Write the three small sample shards the README demo embeds: examples/shards/0000{0,1,2}.tar.

Each shard is a WebDataset tar of 12 synthetic images (shapes on coloured backgrounds, in JPEG, PNG
and WebP, RGB, grey and RGBA, various sizes and aspect ratios) with ``.txt`` captions and ``.json``
sidecars; every shard also holds one corrupt image, which the worker skips and lists in the
shard's manifest. The output is deterministic (fixed seeds and tar timestamps), so rerunning this
script reproduces the committed files.

    python examples/make_sample_shards.py [--out examples/shards]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 210), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "stripes")
SIZES = ((320, 240), (240, 320), (256, 256), (400, 180), (180, 300), (224, 224), (300, 200), (150, 120))
IMAGES_PER_SHARD = 12
MTIME = 1_700_000_000


def draw(shape: str, fg: str, bg: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, COLOURS[bg])
    d = ImageDraw.Draw(img)
    r = min(w, h) // 3
    cx, cy = w // 2 + rng.randint(-w // 8, w // 8), h // 2 + rng.randint(-h // 8, h // 8)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[fg])
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[fg])
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
    else:
        for x in range(0, w, 24):
            d.rectangle((x, 0, x + 11, h), fill=COLOURS[fg])
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 80}, "WEBP": {"quality": 80}, "PNG": {"optimize": True}}[fmt]
    img.save(buf, fmt, **options)
    return buf.getvalue()


def shard_members(index: int) -> list[tuple[str, bytes]]:
    rng = random.Random(1000 + index)
    members: list[tuple[str, bytes]] = []
    corrupt_at = rng.randrange(IMAGES_PER_SHARD)
    for i in range(IMAGES_PER_SHARD):
        key = f"{index:05d}{i:04d}"
        shape = rng.choice(SHAPES)
        fg, bg = rng.sample(sorted(COLOURS), 2)
        size = rng.choice(SIZES)
        img = draw(shape, fg, bg, size, rng)
        fmt, ext = rng.choice((("JPEG", "jpg"), ("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")))
        variant = rng.random()
        if variant < 0.15:
            img = img.convert("L")
        elif variant < 0.25 and fmt != "JPEG":
            img = img.convert("RGBA")
        caption = f"a {fg} {shape} on a {bg} background"
        data = encode(img, fmt)
        if i == corrupt_at:
            data = data[: len(data) // 3]  # a truncated download: skipped and recorded
            caption += " (corrupt image)"
        meta = {"shape": shape, "foreground": fg, "background": bg, "width": size[0], "height": size[1]}
        members += [
            (f"{key}.{ext}", data),
            (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
        ]
    return members


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            info.uname = info.gname = "embedjob"
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "shards")
    parser.add_argument("--shards", type=int, default=3)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for index in range(args.shards):
        path = args.out / f"{index:05d}.tar"
        write_tar(path, shard_members(index))
        total += path.stat().st_size
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    print(f"total {total // 1024} KiB")


if __name__ == "__main__":
    main()
