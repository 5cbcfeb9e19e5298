"""The character-level cleaning every document gets in prepare, and every prompt the served
language model gets (`pipeline/export/pyfunc.py`), so both reach the tokenizer alike. Only `re`
and `unicodedata`: a served model imports it without the data stack (pyarrow)."""

from __future__ import annotations

import re
import unicodedata

# What cleaning changes, and only that. Lone surrogates (a scraper's half emoji, kept by
# json.loads) cannot be encoded at all: dropped and counted. Control characters (Unicode Cc)
# other than newline and tab become a line break where they break lines (CR, CRLF, VT, FF, the
# file/group/record separators, NEL) and a space otherwise, so the words around them stay
# apart. Everything else stays: format characters (ZWJ in emoji and Indic scripts, ZWNJ in
# Persian, bidi marks, soft hyphens, flag tags), private-use characters (icon fonts, private
# CJK) and code points this Python's Unicode database does not know yet (newer emoji), so the
# output does not depend on the Python version. Blanks stay as written, indentation and runs
# inside a line alike: code, tables and aligned text mean something by them, byte-level BPE
# encodes them, and near-duplicate detection (word shingles) already sees through spacing.
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85]")
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]")
_TO_CLEAN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # any of the three above


def clean_characters(doc: str) -> tuple[str, int]:
    """The character-level part of `clean_document`: Unicode NFC, control characters as line
    breaks or spaces, no lone surrogates; and how many surrogates it dropped. Nothing else
    changes, blanks and blank lines included. The served language model applies this to prompts,
    so a prompt reaches the model as the text it was trained on does (a CRLF, a decomposed accent
    or a vertical tab would otherwise be tokens training never saw), without the stripping of
    trailing blanks and newlines that would change what a prompt asks to be continued."""
    surrogates = 0
    if _TO_CLEAN.search(doc):  # one scan; most documents have nothing to replace
        doc, surrogates = _SURROGATES.subn("", doc)
        doc = _CONTROLS.sub(" ", _LINE_BREAKS.sub("\n", doc))
    return unicodedata.normalize("NFC", doc), surrogates
