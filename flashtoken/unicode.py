"""Text as tiktoken sees it: surrogate repair and the code points two regex engines may disagree on.

tiktoken splits text with a Rust regex; FlashToken finds the same piece boundaries with the Python
``regex`` module. The two agree only on code points both classify alike, and their Unicode tables
come from different releases (regex 2026.11 and tiktoken 0.14 differ on ~17.5k code points).
:func:`first_uncertain` finds the first code point whose class is not certain to be the same; the
boundary search treats text from there on as unknown (see docs/ALGORITHM.md, "Unicode tables").
"""

from __future__ import annotations

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
_CATEGORIES = (
    "Lu Ll Lt Lm Lo Mn Mc Me Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So Zs Zl Zp Cc Cf Cs Co".split()
)
# One group per category: match.lastindex names the category ``regex`` gives a character.
_REGEX_CATEGORY = regex.compile("|".join(rf"(\p{{gc={c}}})" for c in _CATEGORIES))

# What has been decided, per character, grown as text is seen: the characters checked so far and,
# of those, the uncertain ones (strict, and grouped). Only ever added to: thread-safe under the
# GIL, and a character's verdict never changes in a process.
_checked: set[str] = set()
_uncertain: dict[bool, set[str]] = {False: set(), True: set()}


def _check(chars: set[str]) -> None:
    """Decide which of ``chars`` tiktoken may classify differently from ``regex``.

    Three Unicode tables are in play: Python's ``unicodedata`` (the oldest: 14.0 on 3.11),
    tiktoken's Rust regex (16.0 in tiktoken 0.14) and the ``regex`` module's (16.0 or newer, by
    the pin ``regex>=2024.11.6``). Assignments are never withdrawn and category changes are rare
    and never reverted, so while tiktoken's tables lie between the other two, a code point on
    which ``unicodedata`` and ``regex`` agree has that category in tiktoken too. One on which they
    disagree (newly assigned, or changed like U+0295, Ll before Unicode 16 and Lo after) is
    uncertain. *Grouped*, only disagreements across the groups the proven patterns tell apart
    count: a new emoji (So, or Cn where unknown) is "other" either way.

    Checked per distinct character as it is first seen (~1 us each), rather than for all 1.1M
    code points up front (~0.3 s on the first non-ASCII text).
    """
    for char in chars:
        if char.isascii():
            continue
        theirs = unicodedata.category(char)
        match = _REGEX_CATEGORY.match(char)
        ours = _CATEGORIES[match.lastindex - 1] if match and match.lastindex else "Cn"
        if theirs != ours:
            _uncertain[False].add(char)
            if _GROUPS.get(theirs, "other") != _GROUPS.get(ours, "other"):
                _uncertain[True].add(char)
    _checked.update(chars)


def first_uncertain(text: str, start: int, end: int, *, grouped: bool = False) -> int:
    """Offset of the first code point in ``text[start:end]`` whose class is uncertain, or ``end``.

    ``grouped`` is for the proven patterns (see :func:`_uncertain_pattern`).
    """
    window = text[start:end]
    if window.isascii():
        return end
    seen = set(window)
    if not _checked.issuperset(seen):
        _check(seen - _checked)
    uncertain = _uncertain[grouped]
    if uncertain.isdisjoint(seen):
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
