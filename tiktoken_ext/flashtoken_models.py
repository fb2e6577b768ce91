"""tiktoken plugin: the open-model encodings FlashToken builds from their packages' files.

tiktoken imports every module of the ``tiktoken_ext`` namespace and reads its
``ENCODING_CONSTRUCTORS``, so with flashtoken installed ``tiktoken.get_encoding("llama3")``,
``"llama4"`` and ``"tekken"`` work offline (with the ``[llama]`` / ``[mistral]`` extras). The
names are FlashToken's own: OpenAI's encodings stay with tiktoken's own plugin, which raises on a
duplicate name anyway. This module must stay cheap and must not fail to import: tiktoken imports
it before it builds *any* encoding.
"""

from flashtoken.models import ENCODING_CONSTRUCTORS

__all__ = ["ENCODING_CONSTRUCTORS"]
