"""tiktoken plugin: the open-model encodings FlashToken builds from their packages' files.

tiktoken imports every module of the ``tiktoken_ext`` namespace and reads its
``ENCODING_CONSTRUCTORS``, so with flashtoken installed ``tiktoken.get_encoding("llama3")``,
``"llama4"`` and ``"tekken"`` work offline (with the ``[llama]`` / ``[mistral]`` extras). The
names are FlashToken's own: OpenAI's encodings stay with tiktoken's own plugin (tiktoken raises
on a duplicate name anyway).

tiktoken imports this module before it builds *any* encoding, so it must never fail to import:
a broken flashtoken installation costs these three names, not every tiktoken encoding.
"""

try:
    from flashtoken.models import ENCODING_CONSTRUCTORS
except Exception:  # only in a broken installation
    ENCODING_CONSTRUCTORS = {}

__all__ = ["ENCODING_CONSTRUCTORS"]
