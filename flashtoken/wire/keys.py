"""Key derivation: the 16-byte keys, namespace tags and chain seeds (docs/PROTOCOL.md, "Keys").

Every derivation is xxh3_128 over length-prefixed fields under a domain tag of its own, so no two
field sequences, and no two kinds of key, hash the same bytes.
"""

from __future__ import annotations

import xxhash


def make_key(
    namespace: bytes, encoding_ident: bytes, allowed: tuple[str, ...], prefix: bytes
) -> bytes:
    """The 16-byte cache key: xxh3_128 over the length-prefixed fields.

    A key locates an entry; it proves nothing (xxh3 has no collision resistance against crafted
    input), so the daemon confirms every hit against the prefix bytes it stores. The namespace is
    a salt: tenants with different salts never share entries, and cannot aim collisions at each
    other's keys without knowing the salt.

    >>> len(make_key(b"", bytes(32), (), b"You are a helpful assistant."))
    16
    """
    h = xxhash.xxh3_128()
    policy = b"".join(
        len(s).to_bytes(8, "little") + s for s in (a.encode("utf-8") for a in allowed)
    )
    for field in (b"flashtoken-key/1", namespace, encoding_ident, policy, prefix):
        # Length-prefixed, so that no two field sequences hash the same bytes.
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    return h.digest()


def namespace_tag(namespace: bytes) -> bytes:
    """The 16 bytes a GET carries for its namespace: the daemon derives the key itself, from
    this tag and the bytes it receives (never from a key a client sends: anyone who knows a
    prompt could otherwise squat its key), and stores and compares the tag in the entry.

    >>> len(namespace_tag(b"tenant-a")), namespace_tag(b"a") == namespace_tag(b"b")
    (16, False)
    """
    h = xxhash.xxh3_128()
    for field in (b"flashtoken-ns/1", namespace):
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    return h.digest()


def make_chain_seed(
    namespace: bytes, encoding_ident: bytes, allowed: tuple[str, ...], block_bytes: int
) -> bytes:
    """The 16-byte seed of an AUTO request: where its chain of block keys starts.

    The daemon keys block ``i`` of a text by ``seed + xxh3_128(text[:(i + 1) * block_bytes])``,
    so the namespace (a salt), the encoding, the policy and the block size all separate chains,
    and the namespace itself never crosses the socket. Like every key, a seed locates; the
    daemon confirms each block by its bytes, its parent block and (at the root) its encoding
    and policy.

    >>> len(make_chain_seed(b"", bytes(32), (), 512))
    16
    """
    h = xxhash.xxh3_128()
    policy = b"".join(
        len(s).to_bytes(8, "little") + s for s in (a.encode("utf-8") for a in allowed)
    )
    fields = (
        b"flashtoken-chain/1",
        namespace,
        encoding_ident,
        policy,
        block_bytes.to_bytes(8, "little"),
    )
    for field in fields:
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    return h.digest()
