"""What the CLIP caption tokenizer costs, against open_clip's SimpleTokenizer (OpenAI's loop) in the same run.

Two rows of cost:
- web-like captions (5-20 words), per caption, with the BPE cache cold and warm;
- one caption that is a single word of random letters, by length: OpenAI's BPE rescans the word for every
  merge (O(n²)); ours keeps the pairs in a heap (O(n log n)). The reference is only run up to
  ``--reference-max`` characters (100 kB took it 99 s).

    .venv/bin/python scripts/tokenizer_cost.py [--lengths 1000,10000,100000,1048576] [--reference-max 20000]
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for tests/ (embedjob: the installed one)

from embedjob.worker.model.tokenizer import ClipTokenizer  # noqa: E402
from tests.worker.test_tokenizer import open_clip_reference  # noqa: E402


def _per_call(fn: Callable[[str], object], items: list[str]) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1000,10000,100000,1048576")
    parser.add_argument("--reference-max", type=int, default=20000)
    parser.add_argument("--captions", type=int, default=5000)
    args = parser.parse_args()

    reference = open_clip_reference()
    rng = random.Random(1)
    ours = ClipTokenizer()
    # 20,000 words of the vocabulary, so that the first pass meets most of them for the first time
    words = [w[:-4] for w in list(ours.encoder)[512:49406] if w.endswith("</w>") and w[:-4].isalpha()]
    words = rng.sample(words, 20000)
    captions = [" ".join(rng.choices(words, k=rng.randint(5, 20))) + rng.choice(["", ".", "!"])
                for _ in range(args.captions)]
    cold = _per_call(ours.tokenize, captions)
    warm = _per_call(ours.tokenize, captions)
    ref_cold = _per_call(reference.encode, captions)  # the reference keeps its own (unbounded) cache
    ref_warm = _per_call(reference.encode, captions)
    print(f"{'captions (5-20 words)':<28} {'embedjob':>12} {'open_clip':>12}")
    print(f"{'  per caption, cache cold':<28} {cold * 1e6:>10.1f}us {ref_cold * 1e6:>10.1f}us")
    print(f"{'  per caption, cache warm':<28} {warm * 1e6:>10.1f}us {ref_warm * 1e6:>10.1f}us")
    print()
    print(f"{'one random word, chars':<28} {'embedjob':>12} {'open_clip':>12}")
    for length in (int(x) for x in args.lengths.split(",")):
        word = "".join(random.Random(length).choices(string.ascii_lowercase, k=length))
        start = time.perf_counter()
        ids = ours.tokenize(word).ids
        took = time.perf_counter() - start
        ref = "-"
        if length <= args.reference_max:
            start = time.perf_counter()
            expected = [t for t in reference([word], context_length=77)[0].tolist() if t]
            ref = f"{time.perf_counter() - start:.3f}s"
            if expected != ids:
                raise SystemExit(f"ids differ from open_clip's at {length} characters")
        print(f"{length:<28} {took:>11.3f}s {ref:>12}")


if __name__ == "__main__":
    main()
