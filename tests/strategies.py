"""hypothesis strategies for text that stresses piece boundaries.

Plain ``st.text()`` rarely produces what breaks a prefix cache (digit runs across the join,
contractions, whitespace runs, class transitions, special-token fragments), so text is drawn
from small atoms that do, mixed with arbitrary code points.
"""

from hypothesis import strategies as st

from tests.corpus import SPECIALS, WHITESPACE

ATOMS = [
    "a", "b", "Z", "Q", "s", "t", "ll", "ve", "'", "'s", "'S", "1", "23", "456", "7890",
    ".", ",", "!", "?", "/", "//", "-", "(", ")", "<", "|", ">", "<|", "|>", "_",
    "中", "文", "日本", "é", "e\u0301", "\u0301", "ǅ", "ʰ", "ʕ", "٣", "ß", "İ",
    "😀", "👩\u200d💻", "\u200d", "\U0001fae8", "\U0001e5d0", "\U000e0001", "\u0378",
    "\ud83d", "\ude00", "\ud83d\ude00",
    *WHITESPACE, "  ", "\r\n", "\n\n", "   \n",
    *SPECIALS, "<|endof", "text|>", "endoftext",
]  # fmt: skip

atoms = st.lists(st.sampled_from(ATOMS), max_size=12).map("".join)
anything = st.text(max_size=8)  # every code point, surrogates included
texts = st.lists(st.one_of(atoms, anything), max_size=4).map("".join)
