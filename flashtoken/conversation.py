"""AppendOnlyPieceTokenCache: the tokens of a text that grows at its end, one delta per append."""

from __future__ import annotations

import bisect
from typing import NamedTuple

import tiktoken

from flashtoken.backends import Encoder, get_encoder
from flashtoken.boundary import cut_rule, find_cut
from flashtoken.encodings import resolve_encoding
from flashtoken.prefix import ORDINARY, EncodingLike, TokenDelta
from flashtoken.specials import SpecialArg, SpecialPolicy, encode_with
from flashtoken.text import require_str


class _Checkpoint(NamedTuple):
    """A stable cut taken when the text was ``length`` characters long.

    It stays valid for every text that starts with the first ``length`` characters of that text.
    """

    length: int
    cut: int
    head_tokens: int


class AppendOnlyPieceTokenCache:
    """Keeps ``tokens == encoding.encode_ordinary(text)`` as ``text`` grows, at a cost per append
    that does not grow with the text.

    Each append returns a :class:`TokenDelta`: drop ``rollback_tokens`` from the end of the token
    list you hold (a KV cache), then add ``tokens_to_append``. Appending can change the last
    tokens already handed out (``"Total: 12"`` + ``"3"``), which is what the rollback is for.

    >>> chat = AppendOnlyPieceTokenCache("cl100k_base", "Total: 12")
    >>> chat.tokens
    [7749, 25, 220, 717]
    >>> chat.append_ordinary("3 apples")
    TokenDelta(rollback_tokens=1, tokens_to_append=[4513, 41776])
    >>> chat.tokens == chat.encoding.encode_ordinary("Total: 123 apples")
    True

    Pass ``allowed_special`` and/or ``disallowed_special`` to follow
    ``encoding.encode(text, allowed_special=..., disallowed_special=...)`` instead; an append that
    would bring in a disallowed special token then raises tiktoken's ValueError and changes nothing.

    Only the last few regex pieces are ever re-encoded (``backtrack_pieces``, default 3); the text
    before them is final. Use :meth:`set_text` when the new text is not a pure append (a chat
    template that rewrites its trailing generation prompt). ``backend`` encodes the re-encoded
    tail and each appended text (see :class:`FixedPrefixTokenCache`).
    """

    def __init__(
        self,
        encoding: EncodingLike,
        initial_text: str = "",
        backtrack_pieces: int | None = None,
        *,
        allowed_special: SpecialArg | None = None,
        disallowed_special: SpecialArg | None = None,
        backend: str | Encoder = "tiktoken",
    ) -> None:
        self._enc = resolve_encoding(encoding)
        self._encoder = get_encoder(self._enc, backend)
        self._rule = cut_rule(self._enc, backtrack_pieces)
        if allowed_special is None and disallowed_special is None:
            self._policy = ORDINARY
        else:
            self._policy = SpecialPolicy.of(
                self._enc,
                frozenset() if allowed_special is None else allowed_special,
                "all" if disallowed_special is None else disallowed_special,
            )
        self._special_mode = self._policy is not ORDINARY
        self._fixed: list[str] = []  # the text before the stable cut, in pieces joined lazily
        self._fixed_len = 0
        self._head: list[int] = []  # its tokens: final
        self._tail = ""  # the text after the stable cut
        self._tail_tokens: list[int] = []  # its tokens, as they stand in the whole text
        self._checkpoints = [_Checkpoint(0, 0, 0)]
        if initial_text:
            self.append(initial_text)

    # -- views ------------------------------------------------------------------------------

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    @property
    def backtrack_pieces(self) -> int:
        """How many trailing pieces each append re-encodes (never below the proven minimum)."""
        return self._rule.pieces

    @property
    def text(self) -> str:
        return self._fixed_text() + self._tail

    def _starts_with_fixed(self, text: str) -> bool:
        """``text.startswith(fixed text)``, without joining the pieces of the fixed text (a copy
        of the whole history) unless they have piled up."""
        if len(self._fixed) > 32:  # join the old pieces; keep the recent ones a rewrite may cut
            self._fixed[:-8] = ["".join(self._fixed[:-8])]
        offset = 0
        for piece in self._fixed:
            if not text.startswith(piece, offset):
                return False
            offset += len(piece)
        return True

    def _truncate_fixed(self, length: int) -> None:
        """Keep the first ``length`` characters of the fixed text (dropping pieces, not copying
        the history)."""
        while self._fixed_len > length:
            piece = self._fixed.pop()
            self._fixed_len -= len(piece)
            if self._fixed_len < length:
                self._fixed.append(piece[: length - self._fixed_len])
                self._fixed_len = length

    def _fixed_text(self) -> str:
        """The text before the stable cut (joined on demand, then kept joined)."""
        if len(self._fixed) > 1:
            self._fixed = ["".join(self._fixed)]
        return self._fixed[0] if self._fixed else ""

    @property
    def tokens(self) -> list[int]:
        """The tokens of :attr:`text` (a new list each time: keep the deltas instead)."""
        return self._head + self._tail_tokens

    @property
    def token_count(self) -> int:
        return len(self._head) + len(self._tail_tokens)

    # -- changes ----------------------------------------------------------------------------

    def append(self, text: str) -> TokenDelta:
        """Append ``text``; return the delta that turns the previous tokens into the new ones."""
        require_str(text, "text")
        self._check_disallowed(self._last_chars(self._policy.reach) + text)
        return self._retokenize(self._tail + text, list(self._tail_tokens))

    def append_ordinary(self, text: str) -> TokenDelta:
        """:meth:`append` for a cache that follows ``encode_ordinary`` (the default)."""
        if self._special_mode:
            raise ValueError(
                "this cache encodes with special tokens (it was given allowed_special or "
                "disallowed_special); use append() instead of append_ordinary()"
            )
        return self.append(text)

    def set_text(self, text: str) -> TokenDelta:
        """Move to a new full ``text``; the delta runs from the longest common prefix.

        Costs what changed (from the last stable cut before the first changed character), not
        the whole text.
        """
        require_str(text, "text")
        if self._starts_with_fixed(text):  # the usual case: memcmp, then only the short tail
            fixed = self._fixed_len
            if text.startswith(self._tail, fixed):
                return self.append(text[fixed + len(self._tail) :])
            same = fixed + _common_prefix_length(self._tail, text[fixed:])
        else:
            same = _common_prefix_length(self._fixed_text(), text)
        reach = self._policy.reach
        self._check_disallowed(text[max(0, same - reach) :])
        # The latest cut still valid: taken when the text was no longer than the common part.
        index = bisect.bisect_right(self._checkpoints, same, key=_length) - 1
        checkpoint = self._checkpoints[index]
        del self._checkpoints[index + 1 :]
        dropped = self._head[checkpoint.head_tokens :] + self._tail_tokens
        del self._head[checkpoint.head_tokens :]
        self._truncate_fixed(checkpoint.cut)
        return self._retokenize(text[checkpoint.cut :], dropped, same - checkpoint.cut)

    def _retokenize(self, tail: str, held: list[int], changed_at: int = 0) -> TokenDelta:
        """Encode ``tail`` (the text after the stable cut), replacing ``held``; advance the cut.

        ``changed_at``: where in ``tail`` a rewrite began. The cut of the text before it is
        remembered too: the next rewrite (a template redoing its generation prompt each turn)
        most likely keeps that much, and can restart there instead of turns earlier.
        """
        tokens = encode_with(self._encoder, tail, self._policy)
        same = _common_prefix_length(held, tokens)
        delta = TokenDelta(len(held) - same, tokens[same:])
        if changed_at:
            cut, kept = find_cut(self._enc, self._rule, self._policy, tail, 0, tokens, changed_at)
            if cut:
                self._checkpoints.append(
                    _Checkpoint(
                        self._fixed_len + changed_at, self._fixed_len + cut, len(self._head) + kept
                    )
                )
        cut, kept = find_cut(self._enc, self._rule, self._policy, tail, 0, tokens)
        self._head += tokens[:kept]
        if cut:
            self._fixed.append(tail[:cut])
            self._fixed_len += cut
        self._tail, self._tail_tokens = tail[cut:], tokens[kept:]
        self._checkpoints.append(
            _Checkpoint(self._fixed_len + len(self._tail), self._fixed_len, len(self._head))
        )
        return delta

    def _check_disallowed(self, text: str) -> None:
        """Raise tiktoken's own error if ``text`` holds a disallowed special token."""
        if self._policy.finds_disallowed(text):
            self._enc.encode(
                text,
                allowed_special=self._policy.allowed,
                disallowed_special=self._policy.disallowed,
            )

    def _last_chars(self, n: int) -> str:
        if n <= 0:
            return ""
        if len(self._tail) >= n:
            return self._tail[-n:]
        return self.text[-n:]

    def __repr__(self) -> str:
        return (
            f"<AppendOnlyPieceTokenCache {self._enc.name} "
            f"{self._fixed_len + len(self._tail)} chars "
            f"{self.token_count} tokens>"
        )


def _length(checkpoint: _Checkpoint) -> int:
    return checkpoint.length


def _common_prefix_length(a: list[int] | str, b: list[int] | str) -> int:
    """Length of the longest common prefix; comparisons run in C, halving the range each time."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
