"""Raw text: the bundled default and the user's own files, decoded and cut into documents.

The default is real data that ships offline: CPython's Language Reference (`pydoc_data.topics`)
and standard-library docstrings, part of every Python install. Images are `image_sources.py`'s.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst")


class DataSourceError(ValueError):
    """The configured source does not exist or has an unsupported format."""


class RefusedFile(DataSourceError):
    """A text file that is not text (binary, or no encoding fits): prepare skips and counts it."""


# A file with no blank lines, or one enormous line, still streams: text files are cut into
# documents of at most this many characters (`decode_lines` cuts inside a line too).
MAX_PARAGRAPH_CHARS = 1 << 20
CUT_WINDOW = 4096  # a cut inside a line goes at the last whitespace within this many characters of the limit


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blank-line separated blocks, read line by line so a file of any size streams. A block is
    closed before a line that would take it past MAX_PARAGRAPH_CHARS (the pieces of a cut line
    are at most that long), so no document grows without bound and no cut adds a newline."""
    block: list[str] = []
    size = 0
    for line in lines:
        line = line.rstrip("\r\n")
        if block and (not line.strip() or size + len(line) > MAX_PARAGRAPH_CHARS):
            yield "\n".join(block)
            block, size = [], 0
        if line.strip():
            block.append(line)
            size += len(line)
    if block:
        yield "\n".join(block)


def _cut(line: str, limit: int) -> tuple[list[str], str]:
    """(pieces of at most `limit` characters, the rest: at most `limit`) of one long line,
    each piece ending at its last whitespace within CUT_WINDOW characters of the limit, or
    exactly at the limit when a stretch has none (one enormous word)."""
    pieces = []
    while len(line) > limit:
        lo = max(1, limit - CUT_WINDOW)
        cut = max(line.rfind(" ", lo, limit), line.rfind("\t", lo, limit)) + 1
        cut = cut if cut > lo else limit
        pieces.append(line[:cut])
        line = line[cut:]
    return pieces, line


def _python_docs() -> Iterator[str]:
    """CPython's Language Reference (pydoc topics) and the docstrings of the standard library.

    Both ship with every Python install. Docstrings are read with `ast`, never by importing
    modules (some have side effects on import).
    """
    import ast
    import sysconfig
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from _paragraphs(topics[name].splitlines())
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted([*root.glob("*.py"), *root.glob("*/*.py")]):
        if {"test", "tests", "idlelib", "site-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def read_text_documents(source: str, text_field: str = "text", encoding: str = "auto") -> Iterator[str]:
    """Yield documents in a stable order: paragraphs of plain text files, records of JSONL,
    rows of Parquet files, rows of a Hugging Face `datasets` data set saved with
    `save_to_disk`. Paths may be local or any fsspec URL (`s3://bucket/prefix`, with s3fs;
    credentials and endpoint from the usual AWS environment variables). Files are streamed and
    columnar sources read one record batch at a time, so memory stays bounded whatever the
    input size. Text and JSONL files are decoded as `decode_lines` describes; a file that is
    not text raises `RefusedFile`, naming it."""
    for unit in text_units(source):
        yield from read_text_unit(unit, text_field, encoding)


def text_units(source: str) -> list[str]:
    """The independent pieces of a text source, in order: one per file, or the whole source
    when it is a builtin or a Hugging Face folder. Prepare maps over them (in-process or as
    Ray tasks) and concatenates the results in this order."""
    if source == "builtin:python-docs":
        return [source]
    if source.startswith("builtin:"):
        raise DataSourceError(f"data.source: unknown builtin text '{source}' (known: builtin:python-docs)")
    fs, path = filesystem(source)
    if not fs.exists(path):
        raise DataSourceError(f"data.source: '{source}' does not exist")
    if not fs.isdir(path):
        if not _readable_suffix(path):
            raise DataSourceError(f"data.source: '{source}' is not a .txt/.md/.rst/.jsonl/.parquet file (a JSON Lines "
                                  "file is read by the name .jsonl; a folder's other files are skipped)")
        return [source]
    local = Path(path)
    if "://" not in source and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        return [source]
    protocol = f"{source.split('://')[0]}://" if "://" in source else ""
    found = _local_files(local) if not protocol else [f for f in fs.find(path) if not _junk(f[len(path):])]
    used = [f"{protocol}{f}" for f in sorted(found) if _readable_suffix(f)]
    if not used:
        raise DataSourceError(f"data.source: no .txt/.md/.rst/.jsonl/.parquet files under '{source}'")
    return used


def _readable_suffix(path: str) -> bool:
    """A file prepare reads, by its name's suffix in any case (NOTES.TXT, DATA.PARQUET)."""
    return path.lower().endswith((*TEXT_SUFFIXES, ".jsonl", ".parquet"))


def _junk(relative: str) -> bool:
    """A path (below the source) inside a hidden or system folder (.git, .ipynb_checkpoints,
    __MACOSX), or a hidden file (macOS's ._name copies): never data, as for image classes."""
    parts = [p for p in relative.split("/") if p]
    return any(p.startswith((".", "__")) for p in parts[:-1]) or bool(parts and parts[-1].startswith("."))


def _local_files(root: Path) -> list[str]:
    """Every file below a local folder, following links to folders (fsspec's `find` does not:
    a linked folder of data would be skipped without a word), each real folder read once so a
    link back up the tree ends instead of looping. Hidden and system entries are skipped
    (`_junk`). Paths are as found through the links, like `find`'s."""
    seen: set[str] = set()
    out: list[str] = []
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError as e:  # a folder without read permission
            raise DataSourceError(f"{folder}: cannot list this folder ({e.strerror or type(e).__name__})") from None
        for e in entries:
            if e.name.startswith(".") or (e.name.startswith("__") and e.is_dir()):
                continue
            if e.is_dir():  # (follows links)
                stack.append(e.path)
            elif e.is_file():
                out.append(e.path)
    return out


def read_text_unit(unit: str, text_field: str = "text", encoding: str = "auto",
                   decoding: Decoding | None = None) -> Iterator[str]:
    """Documents of one unit from `text_units`. `decoding`, when given, is filled in with how a
    text or JSONL file was decoded (`decode_lines`) and how many null text values were skipped;
    `RefusedFile` comes before any document. A file that cannot be opened (no permission) is a
    `DataSourceError` naming it."""
    if unit == "builtin:python-docs":
        yield from _python_docs()
        return
    decoding = decoding if decoding is not None else Decoding()
    fs, path = filesystem(unit)
    if fs.isdir(path):
        yield from _hf_saved(Path(path), text_field, decoding)
        return
    try:
        fh = fs.open(path, "rb")
    except OSError as e:  # PermissionError, or a file removed since text_units listed it
        raise DataSourceError(f"{unit}: cannot read this file ({e.strerror or type(e).__name__})") from None
    with fh:
        if path.lower().endswith(".parquet"):
            yield from _parquet(fh, unit, text_field, decoding)
        elif path.lower().endswith(".jsonl"):  # (a record is parsed whole: its line is not cut)
            yield from _jsonl(decode_lines(fh, unit, encoding, decoding), unit, text_field, decoding)
        else:
            yield from _paragraphs(decode_lines(fh, unit, encoding, decoding, max_line=MAX_PARAGRAPH_CHARS))


def filesystem(source: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(source)
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs installed
        raise DataSourceError(f"data.source: cannot open '{source}' ({e})") from None


# ----------------------------------------------------------------------------- decoding text files
SNIFF_BYTES = 1 << 20  # the encoding is decided on a file's first MiB (the whole of most files)
_CHUNK = 1 << 20
# UTF-32's little-endian mark starts with UTF-16's: longest first.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_ESCAPED = re.compile("[\udc80-\udcff]")  # an undecodable byte under errors="surrogateescape"
# A stray byte in UTF-8 text is nearly always Windows-1252 (Latin-1's superset); its five
# undefined bytes become C1 controls, which cleaning removes.
_CP1252 = {0xDC00 + b: bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(0x80, 0x100)}


@dataclass
class Decoding:
    """How one text file was decoded. `status`: "utf-8" (as is), "repaired" (UTF-8 with
    `repaired_bytes` stray bytes, each read as cp1252), "re-decoded" (in `encoding`, detected
    or named by a byte-order mark), "declared" (data.encoding named the codec)."""

    status: str = "utf-8"
    encoding: str = "utf-8"
    repaired_bytes: int = 0
    null_values: int = 0  # JSONL / Parquet / Arrow records whose text value is null: skipped


def decode_lines(fh, where: str, encoding: str = "auto", decoding: Decoding | None = None,
                 max_line: int | None = None) -> Iterator[str]:
    """The lines of a binary file, decoded strictly (never a silent U+FFFD) chunk by chunk, with
    newlines translated as text mode does ("\\r\\n" and "\\r" become "\\n").

    `encoding="auto"` (data.encoding) decides on the first MiB: a byte-order mark names the
    encoding; valid UTF-8 is UTF-8; UTF-8 with a few stray bytes (fewer than its valid
    multi-byte characters) is *repaired*, each stray byte read as cp1252 and counted; anything
    else is *re-decoded* in the encoding charset-normalizer finds (among equally plausible code
    pages cp1252, unless another is more coherent). NUL bytes (outside UTF-16/32) or no plausible
    encoding: `RefusedFile`, naming the file. Any other `encoding` is a Python codec every file
    is decoded with, strictly. A byte that does not decode further on is a `DataSourceError`
    naming the file and the offset.

    Repair is for a few stray bytes: a file it touches gets a warning on stderr naming it and the
    count, and a stretch where stray bytes come in runs (most follow another: text in another
    encoding, Cyrillic or CJK, after a UTF-8 start) is a `DataSourceError` naming the file and
    offset, not cp1252 mojibake.

    `max_line`, when given, bounds what is held: a longer line comes as pieces of at most that
    many characters (`_cut`), so one enormous line streams like many."""
    decoding = decoding if decoding is not None else Decoding()
    head = fh.read(SNIFF_BYTES)
    codec, repair = _choose_encoding(head, where, encoding, decoding)
    decoding.encoding = codec
    offset = 0
    if codec == "utf-8-sig" and head.startswith(codecs.BOM_UTF8):
        # Skipped here, not by utf-8-sig's decoder: its errors count from after the mark (3 bytes short).
        head, offset, codec = head[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8), "utf-8"
    named = codec if encoding == "auto" else encoding  # errors name the codec the user declared
    inner = codecs.getincrementaldecoder(codec)("strict")
    decoder = io.IncrementalNewlineDecoder(inner, translate=True)
    block, pending = head, []  # pending: the pieces of a line not finished yet
    while True:
        final = not block
        state = decoder.getstate()
        start = offset - len(state[0])  # the decoder may hold the first bytes of a character
        try:
            text = decoder.decode(block, final=final)
        except UnicodeDecodeError as e:
            if not repair:
                raise DataSourceError(f"{where}: not valid {named} at byte {start + e.start} ({e.reason}); "
                                      "set data.encoding to the file's encoding") from None
            decoder.setstate(state)  # this chunk again, its stray bytes escaped, then each read as cp1252
            inner.errors = "surrogateescape"
            text = decoder.decode(block, final=final)
            inner.errors = "strict"
            _check_strays(text, where, start + e.start)
            text = _ESCAPED.sub(lambda m: _repaired(m, decoding), text)
        offset += len(block)
        if "\n" in text:
            lines = text.split("\n")
            pending.append(lines[0])
            lines[0] = "".join(pending)
            pending = [lines.pop()]
            for line in lines:
                if max_line is not None and len(line) > max_line:
                    pieces, line = _cut(line, max_line)
                    yield from pieces
                yield line
        elif text:
            pending.append(text)
        if max_line is not None and sum(map(len, pending)) > max_line:
            pieces, rest = _cut("".join(pending), max_line)
            yield from pieces
            pending = [rest]
        if final:
            break
        block = fh.read(_CHUNK)
    if rest := "".join(pending):
        yield rest
    if decoding.repaired_bytes:
        print(f"warning: {where}: {decoding.repaired_bytes} bytes that are not UTF-8 were read as cp1252 (stray "
              "bytes in UTF-8 text); set data.encoding if the file is in another encoding", file=sys.stderr, flush=True)


STRAY_RUN_MIN = 4  # stray bytes that follow another stray byte, in one chunk, before a run means another encoding


def _check_strays(text: str, where: str, first: int) -> None:
    """Refuse to repair a chunk whose stray bytes come in runs: cp1252 strays in UTF-8 text are
    single characters between ASCII ones (a smart quote, an é), while text in another 8-bit or
    multi-byte encoding (cp1251 Russian, Shift-JIS) is runs of them; read as cp1252 it would be
    mojibake ("Ïðèâåò") with nothing but a counter to show for it."""
    strays = _ESCAPED.findall(text)
    following = len(_STRAY_RUN.findall(text))
    if following >= STRAY_RUN_MIN and following * 2 > len(strays):
        raise DataSourceError(f"{where}: not UTF-8 from about byte {first}: {len(strays)} bytes there are not UTF-8 "
                              "and most come in runs (text in another encoding, not a few stray cp1252 bytes); "
                              "convert the file to UTF-8, or set data.encoding if all of it is in one encoding")


_STRAY_RUN = re.compile("(?<=[\udc80-\udcff])[\udc80-\udcff]")


def _repaired(match: re.Match, decoding: Decoding) -> str:
    decoding.status = "repaired"
    decoding.repaired_bytes += 1
    return _CP1252[ord(match.group())]


# Fewer bytes than this that are not UTF-8 are refused, not re-decoded: a short sample fits several
# encodings about equally (a 69-byte KOI8-R sentence is valid Shift_JIS and was read as Japanese). Measured
# on Russian (KOI8-R, cp1251), Greek and German samples: up to 6 in 10 misread at 96 bytes, none from 112.
MIN_DETECT_BYTES = 160


def _choose_encoding(head: bytes, where: str, encoding: str, decoding: Decoding) -> tuple[str, bool]:
    """(codec, repair stray bytes as cp1252) for a file that starts with `head`."""
    if encoding != "auto":
        if b"\0" in head and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
            raise RefusedFile(f"{where}: a binary file (NUL bytes), not {encoding} text")
        decoding.status = "declared"
        if codecs.lookup(encoding).name == "utf-8" and head.startswith(codecs.BOM_UTF8):
            return "utf-8-sig", False  # Python's utf-8 keeps the byte-order mark as a first character
        return encoding, False
    for bom, codec in _BOMS:
        if head.startswith(bom):
            if codec != "utf-8-sig":
                decoding.status = "re-decoded"
            return codec, codec == "utf-8-sig"
    if b"\0" in head:
        codec = _detect(head)
        if codec is None or not codecs.lookup(codec).name.startswith(("utf-16", "utf-32")):
            raise RefusedFile(f"{where}: a binary file (NUL bytes), not text")
        decoding.status = "re-decoded"
        return codec, False
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(head, final=len(head) < SNIFF_BYTES)
    invalid = len(_ESCAPED.findall(text))
    multibyte = len(text) - len(text.encode("ascii", errors="ignore")) - invalid
    if not invalid or multibyte > invalid:
        return "utf-8", True
    if len(head) < MIN_DETECT_BYTES:
        # a few strays in ASCII text (a smart quote, an é or ü; at most half the bytes, few runs): cp1252, as
        # the repair reads them in longer files; a short text mostly of them (Cyrillic, Greek: every letter a
        # stray byte) is refused
        if invalid * 2 <= len(head) and len(_STRAY_RUN.findall(text)) < STRAY_RUN_MIN:
            return "utf-8", True
        raise RefusedFile(f"{where}: not UTF-8, and {len(head)} bytes are too few to detect its encoding; set "
                          "data.encoding to the file's encoding")
    codec = _detect(head)
    if codec is None:
        raise RefusedFile(f"{where}: not text (not UTF-8, and no encoding fits); set data.encoding if it is text")
    decoding.status = "re-decoded"
    return codec, False


def _detect(head: bytes) -> str | None:
    """The most plausible encoding of `head` by charset-normalizer, or None when none is."""
    from charset_normalizer import from_bytes

    matches = list(from_bytes(head))
    if not matches:
        return None
    best = min(matches, key=lambda m: (m.chaos, -m.coherence))
    # Short Western text often fits several Latin code pages about equally (cp1257 "déją" for "déjà");
    # cp1252, by far the most common, wins unless another is more coherent (language-wise).
    if any("cp1252" in m.could_be_from_charset and m.coherence >= best.coherence for m in matches):
        return "cp1252"
    return best.encoding


def _text_value(value: object, where: str, field: str, decoding: Decoding) -> str | None:
    """The document in one record's text field: a string as is, bytes decoded as UTF-8 (a binary
    column, as Spark writes without a UTF8 annotation), None for a null (skipped, counted in
    `decoding.null_values`). Anything else (a number, an object, a list) would become its Python
    repr as training text: a `DataSourceError` naming the file, the record and the key."""
    if isinstance(value, str):
        return value
    if value is None:
        decoding.null_values += 1
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataSourceError(f"{where}: '{field}' holds bytes that are not UTF-8 text (byte {e.start}: "
                                  f"{e.reason})") from None
    kind = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), f"a {type(value).__name__}")
    raise DataSourceError(f"{where}: '{field}' is {kind}, not text (data.text_field names a field of strings)")


def _jsonl(fh, where: str, field: str, decoding: Decoding) -> Iterator[str]:
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{where}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            kind = {str: "a string", list: "an array", bool: "a boolean", int: "a number", float: "a number"}.get(
                type(record), "null")
            raise DataSourceError(f"{where}:{lineno}: {kind}, not a JSON object with a field '{field}' "
                                  "(data.text_field)")
        if field not in record:
            raise DataSourceError(f"{where}:{lineno}: no field '{field}' (data.text_field)")
        text = _text_value(record[field], f"{where}:{lineno}", field, decoding)
        if text is not None:
            yield text


def _column_batches(batches: Iterator, names: list[str], where: str | Path, field: str,
                    decoding: Decoding) -> Iterator[str]:
    if field not in names:
        raise DataSourceError(f"{where}: no column '{field}' (data.text_field; columns: {', '.join(names)})")
    row = 0
    for batch in batches:
        for value in batch.column(field).to_pylist():
            text = _text_value(value, f"{where}: row {row}", field, decoding)
            row += 1
            if text is not None:
                yield text


def _parquet(fh, where: str, field: str, decoding: Decoding) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(fh, pre_buffer=False)  # pre-buffering would cache whole column chunks
    except (pa.ArrowInvalid, OSError) as e:
        raise DataSourceError(f"{where}: not a readable Parquet file ({e})") from None
    names = f.schema_arrow.names
    yield from _column_batches(f.iter_batches(batch_size=1024, columns=[field] if field in names else None),
                               names, where, field, decoding)


def _hf_listing(path: Path, key: str, kind: type) -> list:
    """The list `key` of a `save_to_disk` metadata file (state.json's data files, dataset_dict.json's
    splits), or one line naming the file when it is cut short, not JSON, or lacks the list."""
    try:
        listing = json.loads(path.read_text()).get(key)
    except (ValueError, AttributeError) as e:  # not JSON (UnicodeDecodeError, JSONDecodeError), or not an object
        raise DataSourceError(f"{path}: not a datasets save_to_disk metadata file ({e}; damaged?)") from None
    if not isinstance(listing, list) or not all(isinstance(x, kind) for x in listing):
        raise DataSourceError(f"{path}: no '{key}' list in it, as datasets' save_to_disk writes (damaged?)")
    return listing


def _hf_saved(root: Path, field: str, decoding: Decoding) -> Iterator[str]:
    """A `datasets` data set written by `save_to_disk`: Arrow IPC stream files listed in
    state.json. Read with pyarrow directly (no `datasets` import needed); for a DatasetDict
    every split is read, in the order its dataset_dict.json lists them."""
    import pyarrow as pa

    if (root / "dataset_dict.json").is_file():
        for split in _hf_listing(root / "dataset_dict.json", "splits", str):
            yield from _hf_saved(root / split, field, decoding)
        return
    for entry in _hf_listing(root / "state.json", "_data_files", dict):
        if not isinstance(entry.get("filename"), str):
            raise DataSourceError(f"{root / 'state.json'}: a _data_files entry without a filename ({entry!r:.80}): "
                                  "not a datasets save_to_disk state file (damaged?)")
        arrow = root / entry["filename"]
        try:
            with pa.memory_map(str(arrow)) as source:
                reader = pa.ipc.open_stream(source)
                yield from _column_batches(iter(reader), reader.schema.names, arrow, field, decoding)
        except pa.ArrowInvalid as e:
            raise DataSourceError(f"{arrow}: not a readable Arrow file ({e})") from None
