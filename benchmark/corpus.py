"""Deterministic text: the stdlib's own documentation and sources, plus prompts the team wrote.

Every Python install has ``pydoc_data.topics`` (the language reference as plain text) and the
stdlib's ``.py`` files, so the corpus needs no download. The same Python version and seed give
the same text; results.json records both.
"""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Iterator

SYSTEM_PROMPT = """\
You are Atlas, the customer-support assistant of Northwind Outfitters. Follow these rules.

1. Be accurate. If you do not know an answer, say so and offer to connect the customer with a human
   agent. Never invent order numbers, prices, tracking links or policies.
2. Be brief: two or three short paragraphs at most, unless the customer asks for detail.
3. Orders: you can look up an order with the `lookup_order` tool once the customer gives an order
   number (format NW-123456) and the e-mail address used at checkout. Confirm both before calling it.
4. Returns are accepted within 30 days of delivery for unworn items with their tags; footwear must be
   returned in its original box. Refunds go to the original payment method in 5-7 business days.
5. Never ask for full card numbers, passwords or one-time codes. If a customer pastes one, tell them
   to remove it and that you did not store it.
6. Tone: warm, direct, no exclamation marks, no emojis unless the customer uses them first.
7. Languages: answer in the customer's language (English, Deutsch, Français, Español, 日本語, 中文).

Store hours: Mon-Fri 09:00-18:00 CET; Sat 10:00-14:00 CET. Phone: +49 30 1234 5678.
"""

RAG_INSTRUCTION = """\
You answer questions using only the documents below. Cite the document title in square brackets
after each claim, e.g. [Lexical analysis]. If the documents do not contain the answer, reply exactly
"I could not find this in the provided documents." Do not use outside knowledge. Quote code verbatim.
Prefer the most specific document; when two documents disagree, say so and cite both.
"""

USER_TURNS = (
    "Hi, my order NW-482913 hasn't arrived yet. It's been 9 days. Can you check?",
    "The e-mail is jonas.becker@example.org. Also, can I change the delivery address?",
    "Ok thanks. If it doesn't come by Friday I'd like a refund, how does that work?",
    "Je voudrais retourner des chaussures, mais j'ai jeté la boîte. C'est possible ?",
    "¿Tienen la chaqueta Fjord en talla M? La página dice agotado desde hace semanas.",
    "サイズ交換はできますか？Mサイズを注文しましたが、少し小さかったです。",
    "Can you explain the difference between the Trail 2 and Trail 3 boots? Waterproofing?",
    "Here is the error I get at checkout:\n```\nTypeError: cannot read property 'total' of undefined\n```",
    "Thanks!! 🙏 That fixed it. One more thing: do you ship to Norway, and what about customs?",
    "I was charged twice: 129.90 EUR on 03/14 and again 129.90 EUR on 03/15. Order NW-771020.",
)

QUESTIONS = (
    "What does the `nonlocal` statement do, and how is it different from `global`?",
    "How are string literal prefixes like rb'' parsed?",
    "When is __del__ called? Is it guaranteed to run?",
    "Explain operator precedence for `not`, `and` and comparison chains.",
    "What happens when a generator's close() method is called?",
    "How do I write a context manager without a class?",
)

# Team-written text in other scripts, so the corpus is not ASCII only.
MULTILINGUAL = (
    "Der schnelle braune Fuchs springt über den faulen Hund. Größenänderung: ÄÖÜ äöü ß.",
    "Le cœur a ses raisons que la raison ne connaît point. Déjà vu, naïve, façade.",
    "東京は日本の首都です。今日はいい天気ですね。漢字とひらがなとカタカナ。",
    "我们今天去公园散步，然后在咖啡馆喝茶。中文分词很有意思。",
    "Привет, как дела? Это тестовый текст на русском языке.",
    "مرحبا بالعالم. هذا نص تجريبي باللغة العربية.",
    "नमस्ते दुनिया। यह हिंदी में एक परीक्षण वाक्य है।",
    "안녕하세요. 오늘 날씨가 정말 좋네요.",
    "Emoji: 👩‍💻🚀✨ 🇩🇪🇯🇵 👍🏽 — and combining: e\u0301 a\u0308 n\u0303.",
)

_SOURCE_MODULES = ("json.decoder", "textwrap", "argparse", "heapq", "fractions", "statistics")


@functools.cache
def documentation() -> str:
    """The language reference topics, concatenated in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@functools.cache
def sources() -> str:
    """A few stdlib modules' source code."""
    import importlib

    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in _SOURCE_MODULES)


@functools.cache
def mixed() -> str:
    """Documentation, code and multilingual text interleaved, ~600 KB, always the same."""
    rng = random.Random(7)
    doc, src = documentation(), sources()
    parts: list[str] = []
    d = s = 0
    while d < len(doc):
        take = rng.randint(2000, 8000)
        parts.append(doc[d : d + take])
        d += take
        if s < len(src):
            take = rng.randint(500, 3000)
            parts.append(src[s : s + take])
            s += take
        parts.append(rng.choice(MULTILINGUAL))
    return "\n".join(parts)


def slice_of(rng: random.Random, length: int, text: str | None = None) -> str:
    """``length`` characters of ``text`` (default: the mixed corpus) from a random offset."""
    text = mixed() if text is None else text
    if length >= len(text):
        return (text * (length // len(text) + 1))[:length]
    start = rng.randrange(0, len(text) - length)
    return text[start : start + length]


def system_prompt(length: int, rng: random.Random, tenant: int = 0) -> str:
    """A system prompt of exactly ``length`` characters: rules, then reference material."""
    head = SYSTEM_PROMPT if tenant == 0 else f"[tenant {tenant:04d}]\n" + SYSTEM_PROMPT
    if length <= len(head):
        return head[:length]
    head += "\n# Reference material\n"
    return head + slice_of(rng, max(0, length - len(head)))


def suffix(length: int, rng: random.Random) -> str:
    """A user message of exactly ``length`` characters (a turn, then quoted corpus text)."""
    body = "\n\nUser: " + rng.choice(USER_TURNS)
    if length <= len(body):
        return body[:length]
    return body + "\n" + slice_of(rng, length - len(body) - 1)


def chat_turns(n: int, rng: random.Random) -> Iterator[str]:
    """``n`` conversation turns in a ChatML-like plain-text template (user and assistant)."""
    for i in range(n):
        user = rng.choice(USER_TURNS)
        answer = slice_of(rng, rng.randint(150, 900), documentation())
        turn = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        yield turn if i else f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n" + turn


def documents(n: int, rng: random.Random, lo: int = 2000, hi: int = 16000) -> list[str]:
    """``n`` retrieved documents of ``lo``..``hi`` characters, each with a title line."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    out = []
    for _ in range(n):
        key = rng.choice(keys)
        body = topics[key] + "\n" + slice_of(rng, hi, documentation())
        out.append(f"## Document: [{key}]\n" + body[: rng.randint(lo, hi)])
    return out


def zipf_indices(rng: random.Random, n_items: int, count: int, s: float) -> list[int]:
    """``count`` draws from a Zipf(s) distribution over ``range(n_items)`` (0 most popular)."""
    weights = [1.0 / (k + 1) ** s for k in range(n_items)]
    return rng.choices(range(n_items), weights=weights, k=count)
