"""Text as tiktoken sees it: surrogate repair and the code points two regex engines may disagree on.

tiktoken splits text with a Rust regex; FlashToken finds the same piece boundaries with the Python
``regex`` module. The two agree only on code points both classify alike, and their Unicode tables
come from different releases (regex 2026.11 and tiktoken 0.14 differ on ~17.5k code points).
:func:`first_uncertain` finds the first code point whose class is not certain to be the same; the
boundary search treats text from there on as unknown (see docs/ALGORITHM.md, "Unicode tables").
"""

from __future__ import annotations

import functools
import unicodedata

import regex

# Every general category but Cn (unassigned), Cs (surrogates never reach a regex here) and Co
# (private use, fixed since Unicode 2.0).
_CATEGORIES = (
    "Lu Ll Lt Lm Lo Mn Mc Me Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So Zs Zl Zp Cc Cf".split()
)


@functools.lru_cache(maxsize=None)
def _uncertain_pattern() -> regex.Pattern[str]:
    """A character class of the code points whose class tiktoken may see differently.

    A code point is certain when Python's own Unicode database (``unicodedata``, an older release
    than tiktoken's) has it assigned and the ``regex`` module puts it in the same general category.
    Assignments are never withdrawn and category changes are rare and not reverted, so when
    tiktoken's tables are no older than ``unicodedata``'s and no newer than ``regex``'s, a certain
    code point has one category in all three. Everything else (unassigned in either, or changed
    in between, like U+0295 which went from Ll to Lo in Unicode 16) is uncertain.

    Built once per process (~0.2 s), only when non-ASCII text first needs it.
    """
    everything = "".join(map(chr, range(0x80, 0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))
    uncertain: list[int] = []
    # Unassigned for regex: unassigned for unicodedata too (assignments only grow).
    for run in regex.finditer(r"\p{gc=Cn}+", everything):
        uncertain.extend(range(ord(run.group()[0]), ord(run.group()[-1]) + 1))
    for category in _CATEGORIES:
        for run in regex.finditer(r"\p{gc=%s}+" % category, everything):
            uncertain.extend(ord(c) for c in run.group() if unicodedata.category(c) != category)
    return regex.compile("[%s]" % "".join(_ranges(sorted(uncertain))))


def _ranges(code_points: list[int]) -> list[str]:
    """Code points as ``\\Ulo-\\Uhi`` pieces of a regex character class."""
    out = []
    i = 0
    while i < len(code_points):
        j = i
        while j + 1 < len(code_points) and code_points[j + 1] == code_points[j] + 1:
            j += 1
        out.append("\\U%08x-\\U%08x" % (code_points[i], code_points[j]))
        i = j + 1
    return out


def first_uncertain(text: str, start: int, end: int) -> int:
    """Offset of the first code point in ``text[start:end]`` whose class is uncertain, or ``end``."""
    if text.isascii():
        return end
    match = _uncertain_pattern().search(text, start, end)
    return match.start() if match else end


def has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def repair_surrogates(text: str) -> str:
    """What tiktoken encodes instead of a str holding surrogates (its own fallback, verbatim).

    Pairs become one astral character, lone surrogates U+FFFD. The repair is local: repairing
    ``a`` and ``b`` apart equals repairing ``a + b`` unless ``a`` ends with a high surrogate and
    ``b`` starts with a low one.
    """
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def is_high_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udbff"


def raw_offset(raw: str, repaired_offset: int) -> int:
    """The offset in ``raw`` whose repair ends at ``repaired_offset`` of ``repair_surrogates(raw)``.

    Never lands inside a surrogate pair (a pair is one repaired character).
    """
    i = n = 0
    while n < repaired_offset:
        if is_high_surrogate(raw[i]) and i + 1 < len(raw) and "\udc00" <= raw[i + 1] <= "\udfff":
            i += 2
        else:
            i += 1
        n += 1
    return i
