"""Text cleaning for product titles and descriptions.

Keeps what carries signal for classification (product codes such as ``Xbox-360``, ``PS4``, scales like
``1/43``, numbers, accents) and removes what does not (HTML markup, entities, control characters).
"""

from __future__ import annotations

import html
import re
import unicodedata

_TAG_RE = re.compile(r"<[^<>]{0,500}>")
_SPACE_RE = re.compile(r"\s+")
# Markup and entities shrink when cleaned: a capped field keeps this many raw characters per clean one.
RAW_CHARS_PER_CLEAN_CHAR = 4


def clean_text(raw: object, max_chars: int | None = None) -> str:
    """HTML-unescape, strip tags, NFC-normalise, drop control characters, collapse whitespace.

    ``max_chars`` bounds the result, and the work: a multi-megabyte field is cut before it is cleaned.
    """
    if raw is None or (isinstance(raw, float) and raw != raw):  # None or NaN from pandas
        return ""
    text = str(raw)
    if max_chars is not None:
        text = text[: max_chars * RAW_CHARS_PER_CLEAN_CHAR]
    # Some descriptions are escaped twice (``&amp;eacute;``); tags may hide behind entities.
    for _ in range(2):
        text = html.unescape(text)
    text = _TAG_RE.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    text = _SPACE_RE.sub(" ", text).strip()
    return text if max_chars is None else text[:max_chars]


# Separates the title from the description in a lexical text (cleaned fields never hold a newline).
TITLE_SEPARATOR = "\n"


def lexical_text(designation: str, description: str, max_chars: int) -> str:
    """What the TF-IDF block reads: the title, then the description, at most ``max_chars`` in all.

    Unlike an encoder, TF-IDF is cheap on the whole description, which holds many of the product's
    terms; the cap bounds a request's cost whatever its size. The title stays separable: it is also a
    block of its own (see ``lib.features.lexical``).
    """
    return f"{designation}{TITLE_SEPARATOR}{description}"[:max_chars]


def product_text(designation: str, description: str, max_description_chars: int) -> str:
    """The text an encoder sees: the title, then the start of the description.

    Encoder cost grows with length; the title carries most of the signal (see README, Encoders).
    """
    description = description[:max_description_chars]
    return f"{designation} . {description}" if description else designation
