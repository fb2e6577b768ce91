"""Text as tiktoken sees it: surrogate repair and the code points two regex engines may disagree on.

tiktoken splits text with a Rust regex; FlashToken finds the same piece boundaries with the Python
``regex`` module. The two agree only on code points both classify alike, and their Unicode tables
come from different releases that may lie in any order (regex 2026.11 is Unicode 17, tiktoken 0.14
Unicode 16, CPython 3.11's ``unicodedata`` 14 and CPython 3.15's 17). :func:`first_uncertain` finds
the first code point whose class is not certain to be the same in *every* plausible table; the
boundary search treats text from there on as unknown (docs/ALGORITHM.md, "Unicode tables").
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import regex

# The general categories, grouped the way every proven pattern (r50k, cl100k, o200k) tells
# them apart: they use \p{L}, \p{N}, \p{M}, \p{Lu}\p{Lt}, \p{Ll}, \p{Lm}\p{Lo} and \s, nothing
# finer. Two code points in one group are interchangeable for those patterns.
_GROUPS = {
    **dict.fromkeys(("Lu", "Lt"), "upper"),
    "Ll": "lower",
    **dict.fromkeys(("Lm", "Lo"), "other-letter"),
    **dict.fromkeys(("Mn", "Mc", "Me"), "mark"),
    **dict.fromkeys(("Nd", "Nl", "No"), "number"),
    # \s is the White_Space property: since Unicode 6.3 exactly these categories plus U+0085 (and
    # ASCII controls). U+180E and U+200B were Zs once and left White_Space since, so a table old
    # enough to call them Zs puts them in another group than a new one: uncertain, as they must be.
    **dict.fromkeys(("Zs", "Zl", "Zp"), "space"),
}
_CATEGORIES = (
    "Lu Ll Lt Lm Lo Mn Mc Me Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So Zs Zl Zp Cc Cf Cs Co".split()
)
# One group per category: match.lastindex names the category ``regex`` gives a character.
_REGEX_CATEGORY = regex.compile("|".join(rf"(\p{{gc={c}}})" for c in _CATEGORIES))


def regex_category(char: str) -> str:
    """The general category the ``regex`` module (and so the boundary scan) gives ``char``."""
    match = _REGEX_CATEGORY.match(char)
    return _CATEGORIES[match.lastindex - 1] if match and match.lastindex else "Cn"


Table = Callable[[str], str]
"""A Unicode table, as the one question asked of it: the general category of a character."""

TABLES: tuple[Table, ...] = (
    unicodedata.ucd_3_2_0.category,  # the baseline: Unicode 3.2, shipped with every CPython
    unicodedata.category,  # this Python's own release
    regex_category,  # what the boundary scan itself sees
)
"""The tables a code point must look alike in to be *certain*. Tests replace it (simulated
orderings: a newer ``unicodedata``, an older ``regex``) and call :func:`forget`."""


def group(category: str, char: str) -> str:
    """The class of ``char`` that the proven patterns can tell apart, given its category."""
    if char == "\x85":  # NEXT LINE, a control (Cc) in the White_Space property
        return "space"
    return _GROUPS.get(category, "other")


def certain(char: str) -> bool:
    """Whether every plausible Unicode table puts ``char`` in the same group.

    tiktoken's tables are some release of their own, older or newer than any table here. A code
    point is certain when the baseline (Unicode 3.2), this Python's ``unicodedata`` and ``regex``
    all put it in one group, and at least one of them knows it (assigned). Assignments are never
    withdrawn and a code point re-grouped (U+0295: Ll until Unicode 15, Lo since) has not been
    re-grouped back, so every release between the baseline and the newest table here agrees too.
    Anything else is uncertain: assigned or re-grouped after the baseline, or unassigned in every
    table here (a newer tiktoken may know it, say as a letter). The one case no table here can
    foresee is a tiktoken newer than all of them that re-groups a code point assigned long ago
    (docs/ALGORITHM.md §7). A new emoji is "other" whether a table knows it (So) or not (Cn).
    """
    if char.isascii():
        return True
    categories = [table(char) for table in TABLES]
    if all(category == "Cn" for category in categories):
        return False
    return len({group(category, char) for category in categories}) == 1


# The verdicts so far, grown as text is seen (~1 us a character, once per process) rather than
# for all 1.1M code points up front (~1 s on the first non-ASCII text). Only ever added to:
# thread-safe under the GIL.
_checked: set[str] = set()
_uncertain: set[str] = set()


def forget() -> None:
    """Drop every verdict (after a test replaced :data:`TABLES`)."""
    _checked.clear()
    _uncertain.clear()


def first_uncertain(text: str, start: int, end: int) -> int:
    """Offset of the first code point in ``text[start:end]`` of uncertain class, or ``end``."""
    window = text[start:end]
    if window.isascii():
        return end
    seen = set(window)
    if not _checked.issuperset(seen):
        new = seen - _checked
        _uncertain.update(char for char in new if not certain(char))
        _checked.update(new)
    if _uncertain.isdisjoint(seen):
        return end
    return start + next(i for i, char in enumerate(window) if char in _uncertain)


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
