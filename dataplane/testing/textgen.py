"""Prose-like test data: compressible the way real text is, generated from a seed.

One generator for the benchmarks, the CCLM scenario and the tests, so that
"text-like data" means the same thing everywhere.
"""

from __future__ import annotations

import itertools
import random

__all__ = ["make_text"]

_ONSETS = ("t", "n", "s", "r", "h", "l", "d", "c", "m", "f", "p", "g", "w", "b", "v", "k", "th", "st", "br",
           "pr", "tr", "ch", "sh", "gr", "pl", "cl", "")
_ONSET_W = (9, 7, 7, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6)
_NUCLEI = ("e", "a", "o", "i", "u", "ea", "ou", "io", "ai", "ee")
_NUCLEUS_W = (12, 8, 8, 7, 3, 1, 1, 1, 1, 1)
_CODAS = ("", "n", "r", "s", "t", "l", "d", "nd", "st", "ng", "rs", "m", "ck", "x")
_CODA_W = (14, 5, 4, 4, 3, 2, 2, 1, 1, 1, 1, 1, 1, 0.3)
_ENDS = (". ", ".\n", "? ", ": ", "; ", ".\n\n", ", ")
_END_W = (50, 15, 3, 3, 4, 3, 10)


def _number(rng: random.Random) -> str:
    q = rng.random()
    if q < 0.5:
        return str(rng.randrange(10 ** rng.randint(1, 4)))
    if q < 0.8:
        return f"{rng.randrange(1000)}.{rng.randrange(100):02d}"
    return str(rng.randrange(10 ** rng.randint(5, 9)))


def make_text(nbytes: int, seed: int = 1, *, vocab: int = 4000, nphrases: int = 1000) -> bytes:
    """*nbytes* of prose-like text: sentences of Zipf-chosen phrases and words, with numbers.

    Words are built from English-like syllables (frequent words are short);
    phrases are 2..7 words; a sentence is a run of phrases (82 %), single
    words (10 %) and numbers (8 %: integers, decimals, long ids), capitalised
    and ended by ``.``/``?``/``:``/``;``/``,`` or a line break. Calibration:
    LZ4 in 64 KiB pieces compresses it to ~0.38 of its size and zlib -6 to
    ~0.21, like CPython's stdlib sources (0.385 and 0.22 the same way).
    """
    rng = random.Random(seed)
    words_set: set[str] = set()
    while len(words_set) < vocab:
        n = rng.choices((1, 2, 3, 4), (30, 40, 22, 8))[0]
        words_set.add("".join(rng.choices(_ONSETS, _ONSET_W)[0] + rng.choices(_NUCLEI, _NUCLEUS_W)[0]
                              + rng.choices(_CODAS, _CODA_W)[0] for _ in range(n)))
    words = sorted(words_set, key=lambda w: len(w) + rng.random() * 4)
    wcum = list(itertools.accumulate(1.0 / (r + 1.5) for r in range(vocab)))
    phrases = [" ".join(rng.choices(words, cum_weights=wcum, k=rng.randint(2, 7))) for _ in range(nphrases)]
    pcum = list(itertools.accumulate(1.0 / (r + 1.5) for r in range(nphrases)))
    out: list[bytes] = []
    size = 0
    while size < nbytes:
        k = 20_000
        phr = rng.choices(phrases, cum_weights=pcum, k=k)
        wds = rng.choices(words, cum_weights=wcum, k=k)
        parts: list[str] = []
        sent: list[str] = []
        for i in range(k):
            r = rng.random()
            sent.append(_number(rng) if r < 0.08 else wds[i] if r < 0.18 else phr[i])
            if rng.random() < 0.22:
                s = " ".join(sent)
                parts.append(s[0].upper() + s[1:])
                parts.append(rng.choices(_ENDS, _END_W)[0])
                sent = []
        chunk = "".join(parts).encode()
        out.append(chunk)
        size += len(chunk)
    return b"".join(out)[:nbytes]
