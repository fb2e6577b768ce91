"""The load-time exactness gate of a fast backend: its answers against tiktoken's on hard texts.

A backend (flashtoken/backends.py) is used for an encoding only after it has returned tiktoken's
ids on every text here, in every mode FlashToken calls it in: ``encode_ordinary``, ``encode`` with
every special token allowed, and ``encode`` with one special token allowed (the others then are
ordinary text). A case the backend refuses (it returns ``None`` or raises) is not a failure: at
run time such a call goes to tiktoken. A case where the backend returns ids tiktoken does not
(or tiktoken raises and the backend does not) fails the gate.

The texts are the places where tokenizers are known to differ: every Unicode whitespace kind in
runs, digit runs, contractions in both cases, letter-class and script transitions, combining
marks, emoji sequences, code, special-token text whole and split, surrogates (tiktoken repairs
them), long runs of one character, and random concatenations of all of these plus random code
points from every plane (a fixed seed, so every process gates on the same texts).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator

import tiktoken

GATE_SEED = 20260601
RANDOM_TEXTS = 400

_WHITESPACE = (
    " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

# Fragments that sit at known traps; the random texts are built from them.
FRAGMENTS = (
    "don't", "I'm", "we'll", "they've", "she'd", "it's", "DON'T", "You'RE", "a's", "'s", "''s",
    "x'sy", "rock'n'roll", "1234567890", "x 12345 y", "3.14159265", "v2024-11-30", "12,345,678",
    "٣٤٥٦", "१२३४५", "camelCaseWord", "HTTPServerError", "中Za", "中文Zabc", "Z中Z", "ǅungla",
    "ʰello", "ÀÉÎõü", "straße STRASSE", "e\u0301te\u0301", "a\u0301\u0302\u0303b",
    "👩\u200d💻 and 👨\u200d👩\u200d👧", "🇫🇷🇩🇪", "👍🏽", "日本語のテキスト、句読点。",
    "中文，标点符号！", "한국어 텍스트", "Мама мыла раму", "ᐃᓄᒃᑎᑐᑦ", "ʕ•ᴥ•ʔ", "\U0001fae8",
    "\u1c89x", "a\u0295b", "Hello!!!\n\nWorld...\n", "a/b/c//d", "path/to/file.py\n", "--->\n",
    "?!?!\n\r\n", "(x)\n(y)", "http://example.com/a?b=c&d=e", "def f(x):\n    return x  # c\n",
    "if (a && b) {\n\treturn;\n}\n", '<div class="x">\n', "SELECT * FROM t WHERE id = 42;",
    "    indented\n        more\n", "x\u00a0y\u2009z", "\u200d\u200dzwj", "!!!???...", "A1B2 c3'd4",
    "<|endof", "text|>", "<|", "|>", "<|<|endoftext|>|>", "<|im_start|>user\n", "<|im_end|>",
    "a\ud83d\ude00b", "x\ud83dy", "\udc00z", "\ud83d\ud83d\ude00",
    "", "a", " ", "  ", "\n", "\r\n", "\n\n\n", "   x", "\t\t\tdef", "end   ",
)  # fmt: skip


def gate_texts(enc: tiktoken.Encoding, seed: int = GATE_SEED) -> Iterator[str]:
    """Every text of the gate for ``enc`` (its special tokens included), in a fixed order."""
    specials = sorted(enc.special_tokens_set)[:8]
    yield from FRAGMENTS
    for ws in _WHITESPACE:
        for n in (1, 2, 3, 5, 17):
            yield f"word{ws * n}next"
            yield f"word{ws * n}"
            yield ws * n + "x"
    for special in specials:
        yield special
        yield f"x {special} y"
        yield f"{special}{special}\n{special[:-2]}"
        yield f"text{special}more text{special[:5]}"
    # Long runs: the regex's backtracking and the BPE's worst cases (one merge at a time).
    for ch in (" ", "\n", " \n", "\t", "\u3000", "a", "1", "中", "👍", "\r\n", ".", "\u0301"):
        for n in (64, 1000, 20000):
            yield ch * n
            yield "x" + ch * n + "y"
    yield "".join(chr(c) for c in range(0x20, 0x3000))
    rng = random.Random(seed)
    pool = FRAGMENTS + tuple(specials) + tuple(_WHITESPACE)
    for _ in range(RANDOM_TEXTS):
        parts = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        for _ in range(rng.randint(0, 3)):
            parts.insert(rng.randint(0, len(parts)), _random_char(rng) * rng.randint(1, 4))
        yield "".join(parts)


def _random_char(rng: random.Random) -> str:
    """A code point from anywhere (lone surrogates and unassigned ones included)."""
    plane = rng.random()
    if plane < 0.6:
        return chr(rng.randint(0x80, 0xFFFF))
    if plane < 0.9:
        return chr(rng.randint(0x10000, 0x1FFFF))
    return chr(rng.randint(0x20000, 0x10FFFF))


Attempt = Callable[[str], "list[int] | None"]


def _outcome(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the outcome is the exception's type
        return ("raises", type(exc).__name__)
    except BaseException as exc:  # pyo3's PanicException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return ("raises", type(exc).__name__)


def run_gate(
    enc: tiktoken.Encoding,
    ordinary: Attempt,
    special: Callable[[str, frozenset[str]], list[int] | None],
) -> str | None:
    """None if the backend agrees with tiktoken on every text it takes, else the first failing
    case, described (mode and text) for the warning.

    ``ordinary(text)`` / ``special(text, allowed)`` are the backend's answers: ids, or None where
    it refuses the text (it may also raise: also a refusal, the call would go to tiktoken).
    """
    every = frozenset(enc.special_tokens_set)
    one = frozenset(sorted(every)[:1])
    modes: tuple[tuple[str, Callable[[str], object], Callable[[str], object]], ...] = (
        ("encode_ordinary", ordinary, enc.encode_ordinary),
        (
            "encode(allowed_special='all')",
            lambda t: special(t, every),
            lambda t: enc.encode(t, allowed_special=every, disallowed_special=()),
        ),
        (
            f"encode(allowed_special={set(one)})",
            lambda t: special(t, one),
            lambda t: enc.encode(t, allowed_special=one, disallowed_special=()),
        ),
    )
    starts = tuple({token[0] for token in every})
    for text in gate_texts(enc):
        # Without a special token's first character FlashToken calls encode_ordinary instead.
        holds_special = any(start in text for start in starts)
        for mode, mine, theirs in modes if holds_special else modes[:1]:
            got = _outcome(functools.partial(mine, text))
            if got is None or (isinstance(got, tuple) and got[:1] == ("raises",)):
                continue  # refused: this call goes to tiktoken at run time
            want = _outcome(functools.partial(theirs, text))
            if got != want:
                shown = text if len(text) <= 60 else text[:57] + "..."
                return (
                    f"{mode} of {shown!r} (len {len(text)}): got {_short(got)},"
                    f" tiktoken {_short(want)}"
                )
    return None


def _short(value: object) -> str:
    if isinstance(value, list) and len(value) > 8:
        return f"{value[:8]}... ({len(value)} ids)"
    return repr(value)


# -- code points whose class the backend's Unicode tables may give otherwise ----------------------

_GROUP_PATTERNS = {
    "upper": r"[\p{Lu}\p{Lt}]+",
    "lower": r"\p{Ll}+",
    "other-letter": r"[\p{Lm}\p{Lo}]+",
    "mark": r"\p{M}+",
    "number": r"\p{N}+",
    "space": r"\s+",
}
# Contexts that put a code point's class to work in every proven pattern: next to punctuation
# (letter, number, mark or space against "other"), inside a word (letter against number, mark or
# case), after a digit, before a capital.
_CONTEXTS = ("{c}:A", "a{c}a", "1{c} ", "A{c}A ")
_CHUNK = 128


def candidate_code_points() -> str:
    """The code points this Python's ``unicodedata`` and the ``regex`` module group differently:
    those assigned or re-grouped between their two Unicode releases (27,045 of them for
    Unicode 14 against 17). tiktoken's tables and a backend's are each some release near these,
    and where two releases differ is among them (assignments are never withdrawn)."""
    import unicodedata

    import regex

    from flashtoken.unicode import group

    every = "".join(map(chr, range(0x80, 0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))
    category = unicodedata.category
    found: list[str] = []
    for name, pattern in _GROUP_PATTERNS.items():
        for match in regex.finditer(pattern, every):
            found.extend(ch for ch in match.group() if group(category(ch), ch) != name)
    return "".join(sorted(set(found)))


def disagreeing_code_points(
    enc: tiktoken.Encoding, ordinary: Attempt, candidates: str | None = None
) -> str:
    """The candidates on which the backend's ``ordinary`` answers otherwise than tiktoken in one
    of :data:`_CONTEXTS`; a text holding one of them must go to tiktoken. Chunks of candidates
    are compared whole and only a differing chunk is split, so the cost is about one tiktoken
    encode of every candidate in every context (~0.1-0.3 s)."""
    if candidates is None:
        candidates = candidate_code_points()

    def probe(chars: str) -> str:
        return "".join(context.format(c=c) for c in chars for context in _CONTEXTS)

    def agrees(chars: str) -> bool:
        text = probe(chars)
        return _outcome(functools.partial(ordinary, text)) == enc.encode_ordinary(text)

    bad: list[str] = []
    pending = [candidates[i : i + _CHUNK] for i in range(0, len(candidates), _CHUNK)]
    while pending:
        chars = pending.pop()
        if agrees(chars):
            continue
        if len(chars) == 1:
            bad.append(chars)
        else:
            half = len(chars) // 2
            pending += [chars[:half], chars[half:]]
    return "".join(sorted(bad))
