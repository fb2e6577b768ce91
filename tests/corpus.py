"""The adversarial boundary corpus: texts that are split at every offset into (prefix, suffix).

Each entry is a place where appending text is known to change tokenization, or where a
careless cache would go wrong. Written by hand; see docs/ALGORITHM.md for why each matters.
"""

WHITESPACE = [
    " ", "\t", "\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2000", "\u2001", "\u2002",
    "\u2003", "\u2004", "\u2005", "\u2006", "\u2007", "\u2008", "\u2009", "\u200a", "\u2028",
    "\u2029", "\u202f", "\u205f", "\u3000",
]  # fmt: skip

SPECIALS = "<|endoftext|>", "<|endofprompt|>", "<|fim_prefix|>", "<|start|>", "<|message|>"

CORPUS = [
    # whitespace runs of every Unicode kind, and CRLF
    *(f"word{ws * n}next" for ws in WHITESPACE for n in (1, 2, 5)),
    "a  \n  b", "x \r\n\r\n y", "\r\n\r\n\r\n", "end   ", "   ", "\n\n\nfoo\n", "a\t\t\n \tb",
    # digit runs across the join
    "1234567890", "x 12345 y", "3.14159265", "v2024-11-30", "12,345,678", "٣٤٥٦", "१२३४५",
    # contractions, split anywhere
    "don't", "I'm", "we'll", "they've", "she'd", "it's", "DON'T", "You'RE", "a's", "rock'n'roll",
    "'s 't", "''s", "x'sy",
    # case and class transitions
    "camelCaseWord", "HTTPServerError", "中Za", "中文Zabc", "Z中Z", "ǅungla", "ʰello", "ABCdef",
    "aBcDeF", "helloWORLD", "ÀÉÎõü", "straße STRASSE",
    # combining marks, ZWJ emoji, CJK
    "e\u0301te\u0301", "a\u0301\u0302\u0303b", "👩\u200d💻 and 👨\u200d👩\u200d👧", "🇫🇷🇩🇪",
    "日本語のテキスト、句読点。", "中文，标点符号！", "한국어 텍스트", "ʕ•ᴥ•ʔ",
    "\U0001fae8 new emoji",
    # punctuation with newlines, slashes
    "Hello!!!\n\nWorld...\n", "a/b/c//d", "path/to/file.py\n", "--->\n", "?!?!\n\r\n", "(x)\n(y)",
    "http://example.com/a?b=c&d=e", "...\n...\n",
    # code
    "def f(x):\n    return x  # comment\n", "if (a && b) {\n\treturn;\n}\n", "<div class=\"x\">\n",
    "SELECT * FROM t WHERE id = 42;", "x = [1, 2, 3]\n\n\n", "    indented\n        more\n",
    # chat templates with special tokens
    "<|start|>user<|message|>Hi there<|end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n",
    "text<|endoftext|>more text", "<|endofprompt|> after", "<|endof", "text|>", "<|<|endoftext|>|>",
    "<|fim_prefix|>def<|fim_suffix|>\n<|fim_middle|>",
    # surrogates (tiktoken repairs them: pairs join, lone ones become U+FFFD)
    "a\ud83d\ude00b", "x\ud83dy", "\udc00z", "\ud83d\ud83d\ude00",
    # empty and tiny
    "", "a", " ", "\n",
]  # fmt: skip


def splits(text: str):
    """Every (prefix, suffix) split of ``text``."""
    return [(text[:i], text[i:]) for i in range(len(text) + 1)]
