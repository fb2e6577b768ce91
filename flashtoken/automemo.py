"""The memo of automatic reuse: the last path of a policy, what the next text of a chat reuses.

Most texts extend the previous one (a growing chat) or share all but its last blocks (a
rewritten generation prompt). ``flashtoken.AutoPrefixCache`` keeps, per policy, the path of its
last lookup with the path's tokens joined, the text's bytes and the start of its characters, so
that the next lookup pays for what is new in its text: a memcmp finds the shared blocks
(:func:`shared_blocks`), the shared bytes are copied rather than encoded again (:func:`utf8`)
and the shared tokens are one slice of a list already joined.
"""

from __future__ import annotations

from typing import NamedTuple

from flashtoken.chains import Node

__all__ = ["Memo", "next_memo", "shared_blocks", "utf8"]


class Memo(NamedTuple):
    """The last path of a policy, its tokens joined. Usable while its last node is stored
    (then, leaves going first, so is every node of the path)."""

    data: bytes  # the text's UTF-8
    path: list[Node]
    digests: list[int]  # of path's blocks
    ends: list[int]  # ends[i]: how many tokens path[: i + 1] holds
    head: list[int]  # path's tokens, joined (never handed out; may run on past ends[-1])
    state: object  # the xxh3 state after the path's last block
    text: str  # the text's characters up to its path's last cut ...
    text_bytes: int  # ... and how many bytes of ``data`` they are


def next_memo(
    data: bytes,
    path: list[Node],
    digests: list[int],
    state: object,
    text: str,
    memo: Memo | None,
    shared: int,
) -> Memo:
    """The memo for ``path`` (non-empty), found for ``text`` (``data`` its UTF-8) from ``memo``'s
    first ``shared`` blocks. Its joined tokens extend ``memo``'s list in place when that list
    ends where this path leaves it (a growing chat): a lookup never pays for joining what the
    last one joined already."""
    if memo is not None and shared:
        base = memo.ends[shared - 1]
        head = memo.head if len(memo.head) == base else memo.head[:base]
        ends = memo.ends[:shared]
    else:
        head, ends = [], []
    for node in path[shared:]:
        head += node.tokens  # in place: earlier plans slice only up to their own end
        ends.append(len(head))
    cut = path[-1].cut
    # The bytes of text[:cut] counted from the rest's, never taken from the node: exact by
    # UTF-8's construction (each character's bytes on their own), whatever recorded the cut.
    text_bytes = len(data) - len(text[cut:].encode("utf-8"))
    return Memo(data, path, digests[: len(path)], ends, head, state, text[:cut], text_bytes)


def utf8(text: str, memo: Memo | None) -> bytes:
    """``text.encode("utf-8")``, the bytes of the start ``text`` shares with the memo's text
    copied from the memo: encoding a long chat's whole text cost a request ~40 us for 100 KB
    of text with an emoji in it (several times that on a busy host), the comparison and the
    copy ~15 us. Raises UnicodeEncodeError as ``str.encode`` does (lone surrogates can only be
    in the part encoded: the memo's text was encoded before)."""
    if memo is not None and memo.text and text.startswith(memo.text):
        return memo.data[: memo.text_bytes] + text[len(memo.text) :].encode("utf-8")
    return text.encode("utf-8")


def shared_blocks(data: bytes, other: memoryview, blocks: int, size: int) -> int:
    """How many of the first ``blocks`` blocks of ``other`` start ``data`` (a binary search
    of memcmps: a few for a rewritten tail, one for a text that extends ``other``)."""
    # bytes.startswith(view) is a memcmp; comparing two memoryviews is ~60x slower.
    if data.startswith(other[: blocks * size]):
        return blocks
    low, high = 0, blocks - 1  # data shares low blocks, not high + 1
    while low < high:
        mid = (low + high + 1) // 2
        if data.startswith(other[: mid * size]):
            low = mid
        else:
            high = mid - 1
    return low
