"""The caption tokenizer against open_clip's SimpleTokenizer (OpenAI's, with the same merges file) on
hostile web captions: ids equal, cut to the context length with <|endoftext|> last."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from embedjob.worker.model.tokenizer import CONTEXT_LENGTH, ClipTokenizer, clean_caption, clip_tokenizer

HOSTILE = [
    "Tom &amp; Jerry",
    "Tom &amp;amp; Jerry &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &nbsp;nbsp",
    "Ã©tÃ© Ã  Paris â€” cafÃ©",  # mojibake: UTF-8 read as cp1252
    "Caf\u00e9 na\u00efve \u00c9T\u00c9 \u0130stanbul \u00df \ufb01 ligature",
    "a photo of a 🐶 with 👩‍👩‍👧 and 🏳️‍🌈 flags 🇫🇷",
    "日本語のキャプション、中文标题，한국어 캡션",
    "  lots\t\tof \n\n whitespace\u00a0and\u2003em spaces  ",
    "",
    "   ",
    "<|endoftext|> spelled out <|startoftext|>",
    "it's we're they've I'm you'll he'd DON'T",
    "price: $1,299.99 (-20%) #sale @shop https://example.com/a?b=c&d=e",
    "x" * 500,
    "\ufffd\ufffd bytes that were not UTF-8 \ufffd",
    " ".join(f"word{i} and more" for i in range(300)),  # a 300-word caption (900 words): cut
    "a " * 75,  # exactly fills the context: 75 tokens + sot + eot
    "a " * 76,  # one too many
]


@pytest.fixture(scope="module")
def reference():
    return open_clip_reference()


def open_clip_reference():
    """open_clip's SimpleTokenizer, its module loaded from its file: open_clip/__init__ would import timm
    and torchvision, which the worker does not install (setup.sh installs open-clip-torch --no-deps)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("open-clip-torch (the reference tokenizer) is not installed: run scripts/setup.sh")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.mark.parametrize("caption", HOSTILE, ids=range(len(HOSTILE)))
def test_ids_match_open_clip(reference, caption):
    ours = clip_tokenizer().tokenize(caption)
    ref = reference([caption])[0].tolist()
    n = len(ours.ids)
    assert ours.ids == ref[:n] and all(t == 0 for t in ref[n:])
    assert ours.ids[0] == 49406 and ours.ids[-1] == 49407 and n <= CONTEXT_LENGTH
    body = len(reference.encode(caption))
    assert ours.truncated == (body + 2 > CONTEXT_LENGTH)


def test_non_utf8_caption_bytes_as_the_tar_reader_decodes_them(reference):
    raw = b"caf\xe9 \xff\xfe broken \xc3\x28 utf8"
    caption = raw.decode("utf-8", errors="replace")  # embedjob.worker.datapath.read._decode_text
    assert clip_tokenizer().tokenize(caption).ids == [t for t in reference([caption])[0].tolist() if t]


def test_cleaning_fixes_entities_and_mojibake():
    assert clean_caption("Tom &amp;amp; Jerry") == "tom & jerry"
    assert clean_caption("Ã©tÃ©") == "été"
    assert clean_caption(" A\t B \n") == "a b"


def test_cut_keeps_endoftext_last_and_counts_truncation():
    tok = ClipTokenizer(context_length=8)
    cut = tok.tokenize("one two three four five six seven")
    assert len(cut.ids) == 8 and cut.ids[-1] == tok.eot_id and cut.truncated
    fits = tok.tokenize("one two three four five six")
    assert len(fits.ids) == 8 and not fits.truncated


def test_identity_names_the_merges():
    ident = clip_tokenizer().identity()
    assert ident["vocabSha256"] == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert ident["contextLength"] == 77 and ident["vocabSize"] == 49408


def _random_ascii(rng, n: int, alphabet: str) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def test_ftfy_and_unescaping_leave_printable_ascii_without_entities_as_it_is():
    """What lets clean_caption skip ftfy and unescaping for most captions: on printable ASCII without
    '&' both are the identity. Random strings over every such character, and words."""
    import html
    import random
    import string

    import ftfy

    rng = random.Random(7)
    alphabet = "".join(c for c in string.printable if c.isprintable() and c != "&")
    words = ["it's", "DON'T", "<b>", "a--b", "x;y", "#39", "lt;", "\\u00e9", "\\x1b[31m", "''", "``", "..."]
    captions = _random_ascii(rng, 5000, alphabet) + [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    for caption in captions:
        assert ftfy.fix_text(caption) == caption and html.unescape(caption) == caption, caption


def test_random_captions_match_open_clip(reference):
    """Plain ASCII captions (the fast path), and ones with entities, whitespace, control and non-ASCII
    characters (the full path): ids equal open_clip's."""
    import random
    import string

    rng = random.Random(11)
    captions = _random_ascii(rng, 400, string.printable) + _random_ascii(rng, 400, string.ascii_letters + " .,'!&;#")
    captions += [c + rng.choice(["é", "\u2019", "\x00", "\r\n", "&amp;", "\u00a0"]) + c for c in captions[:200]]
    tok = clip_tokenizer()
    for caption in captions:
        ref, ids = reference([caption])[0].tolist(), tok.tokenize(caption).ids
        assert ids == ref[: len(ids)] and not any(ref[len(ids):]), repr(caption)


def test_every_merge_is_ranked_after_the_merges_that_make_its_parts():
    """What the heap BPE's equality with OpenAI's loop rests on (see ``ClipTokenizer._bpe_uncached``): each
    token is made by one merge, and a pair is ranked after the merges that make its parts."""
    ranks = clip_tokenizer()._ranks
    made: dict[str, list[int]] = {}
    for (a, b), rank in ranks.items():
        made.setdefault(a + b, []).append(rank)
    assert all(len(r) == 1 for r in made.values())
    late = [(pair, rank) for pair, rank in ranks.items() for part in pair if made.get(part, [-1])[0] >= rank]
    assert late == []


def test_long_words_have_open_clip_bpe(reference):
    """Whole pieces (not only what the context keeps) of random letters, of two letters (long runs of one
    rank), of vocabulary words glued together and of any byte: the same ids as open_clip's ``bpe``."""
    import random
    import string

    tok = ClipTokenizer()
    rng = random.Random(5)
    byte_chars = list(tok._byte_chars.values())
    glued = [w[:-4] for w in list(tok.encoder)[512:49406] if w.endswith("</w>") and w[:-4].isalpha()]
    pieces = []
    for _ in range(60):
        length = rng.randint(1, 600)
        pieces += ["".join(rng.choices(string.ascii_lowercase, k=length)), "".join(rng.choices("ab", k=length)),
                   "".join(rng.choices(glued, k=rng.randint(1, 40))), "".join(rng.choices(byte_chars, k=length))]
    for piece in pieces:
        assert list(tok._bpe_uncached(piece)) == [reference.encoder[t] for t in reference.bpe(piece).split(" ")], piece


@pytest.mark.timeout(120)
def test_a_one_mib_caption_of_one_word_is_tokenized_and_not_cached():
    """The sidecar limit admits a 1 MiB caption; one random word of that size took OpenAI's O(n²) loop hours
    (100 kB: 99 s). Now seconds, and the cache keeps no piece that long (its key would be the whole text)."""
    import random
    import string

    tok = ClipTokenizer()
    word = "".join(random.Random(9).choices(string.ascii_lowercase, k=1 << 20))
    out = tok.tokenize(word)
    assert out.truncated and len(out.ids) == CONTEXT_LENGTH and out.ids[-1] == tok.eot_id
    assert tok._bpe_cached.cache_info().currsize == 0
    tok.tokenize("a short caption")
    assert tok._bpe_cached.cache_info().currsize == 3
