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

# The general categories, grouped the way every proven pattern (r50k, cl100k, o200k) tells
# them apart: they use \p{L}, \p{N}, \p{M}, \p{Lu}\p{Lt}, \p{Ll}, \p{Lm}\p{Lo} and \s, nothing
# finer. Two categories in one group are interchangeable for those patterns.
_GROUPS = {
    **dict.fromkeys(("Lu", "Lt"), "upper"),
    "Ll": "lower",
    **dict.fromkeys(("Lm", "Lo"), "other-letter"),
    **dict.fromkeys(("Mn", "Mc", "Me"), "mark"),
    **dict.fromkeys(("Nd", "Nl", "No"), "number"),
}
# Every general category but Cn (unassigned for ``regex``, the newest table, is unassigned in
# the older ones too: nothing to compare) and Co (private use, fixed since Unicode 2.0).
_CATEGORIES = "Lu Ll Lt Lm Lo Mn Mc Me Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So Zs Zl Zp Cc Cf".split()


@functools.lru_cache(maxsize=None)
def _uncertain_chars(grouped: bool) -> frozenset[str]:
    """The code points whose class tiktoken may see differently.

    Three Unicode tables are in play: Python's ``unicodedata`` (the oldest: 14.0 on 3.11),
    tiktoken's Rust regex (16.0 in tiktoken 0.14) and the ``regex`` module's (16.0 or newer, by
    the pin ``regex>=2024.11.6``). Assignments are never withdrawn and category changes are rare
    and never reverted, so while tiktoken's tables lie between the other two, a code point on
    which ``unicodedata`` and ``regex`` agree has that category in tiktoken too. A code point on
    which they disagree (newly assigned, or changed like U+0295, Ll before Unicode 16 and Lo
    after) is uncertain. With ``grouped``, only disagreements across the groups the proven
    patterns tell apart count: a new emoji (So, or Cn where unknown) is "other" either way.

    Built once per process (~0.3 s), only when non-ASCII text first needs it.
    """
    everything = "".join(map(chr, range(0x80, 0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))
    uncertain: list[int] = []
    for category in _CATEGORIES:
        for run in regex.finditer(r"\p{gc=%s}+" % category, everything):
            for char in run.group():
                theirs = unicodedata.category(char)
                if theirs != category and (
                    not grouped or _GROUPS.get(theirs, "other") != _GROUPS.get(category, "other")
                ):
                    uncertain.append(char)
    # A set, not a regex character class: with ~27k members in many ranges, regex's class
    # search costs ~200 ns per character of text, the set's isdisjoint ~7.
    return frozenset(uncertain)


def first_uncertain(text: str, start: int, end: int, *, grouped: bool = False) -> int:
    """Offset of the first code point in ``text[start:end]`` whose class is uncertain, or ``end``.

    ``grouped`` is for the proven patterns (see :func:`_uncertain_pattern`).
    """
    window = text[start:end]
    if window.isascii():
        return end
    uncertain = _uncertain_chars(grouped)
    if uncertain.isdisjoint(window):
        return end
    return start + next(i for i, char in enumerate(window) if char in uncertain)


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
