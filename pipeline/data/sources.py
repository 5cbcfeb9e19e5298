"""Raw inputs: the bundled defaults and the user's own files.

Defaults are real data that ship offline: CPython's Language Reference (`pydoc_data.topics`)
and standard-library docstrings, part of every Python install, and scikit-learn's 8x8
handwritten digits.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".rst")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Up to this many classes an .npz may hold fewer images than classes (a small subset of CIFAR-100, say);
# beyond it, a largest label above the image count is a mistake (a label of 100,000: as many class rows).
MAX_SPARSE_CLASSES = 1000


class DataSourceError(ValueError):
    """The configured source does not exist or has an unsupported format."""


class RefusedFile(DataSourceError):
    """A text file that is not text (binary, or no encoding fits): prepare skips and counts it."""


MAX_PARAGRAPH_CHARS = 1 << 20  # a file with no blank lines still streams: cut very long blocks


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blank-line separated blocks, read line by line so a file of any size streams."""
    block: list[str] = []
    size = 0
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip():
            block.append(line)
            size += len(line)
            if size < MAX_PARAGRAPH_CHARS:
                continue
        if block:
            yield "\n".join(block)
            block, size = [], 0
    if block:
        yield "\n".join(block)


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
    fs, path = _filesystem(source)
    if not fs.exists(path):
        raise DataSourceError(f"data.source: '{source}' does not exist")
    if not fs.isdir(path):
        return [source]
    local = Path(path)
    if "://" not in source and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        return [source]
    protocol = f"{source.split('://')[0]}://" if "://" in source else ""
    used = [f"{protocol}{f}" for f in sorted(fs.find(path)) if f.endswith((*TEXT_SUFFIXES, ".jsonl", ".parquet"))]
    if not used:
        raise DataSourceError(f"data.source: no .txt/.md/.rst/.jsonl/.parquet files under '{source}'")
    return used


def read_text_unit(unit: str, text_field: str = "text", encoding: str = "auto",
                   decoding: Decoding | None = None) -> Iterator[str]:
    """Documents of one unit from `text_units`. `decoding`, when given, is filled in with how a
    text or JSONL file was decoded (`decode_lines`); `RefusedFile` comes before any document."""
    if unit == "builtin:python-docs":
        yield from _python_docs()
        return
    fs, path = _filesystem(unit)
    if fs.isdir(path):
        yield from _hf_saved(Path(path), text_field)
    elif path.endswith(".parquet"):
        with fs.open(path, "rb") as fh:
            yield from _parquet(fh, unit, text_field)
    else:
        with fs.open(path, "rb") as fh:
            lines = decode_lines(fh, unit, encoding, decoding if decoding is not None else Decoding())
            yield from _jsonl(lines, unit, text_field) if path.endswith(".jsonl") else _paragraphs(lines)


def _filesystem(source: str):
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


def decode_lines(fh, where: str, encoding: str = "auto", decoding: Decoding | None = None) -> Iterator[str]:
    """The lines of a binary file, decoded strictly (never a silent U+FFFD) chunk by chunk, with
    newlines translated as text mode does ("\\r\\n" and "\\r" become "\\n").

    `encoding="auto"` (data.encoding) decides on the first MiB: a byte-order mark names the
    encoding; valid UTF-8 is UTF-8; UTF-8 with a few stray bytes (fewer than its valid
    multi-byte characters) is *repaired*, each stray byte read as cp1252 and counted; anything
    else is *re-decoded* in the encoding charset-normalizer finds (among equally plausible code
    pages cp1252, unless another is more coherent). NUL bytes (outside UTF-16/32) or no plausible
    encoding: `RefusedFile`, naming the file. Any other `encoding` is a Python codec every file
    is decoded with, strictly. A byte that does not decode further on is a `DataSourceError`
    naming the file and the offset."""
    decoding = decoding if decoding is not None else Decoding()
    head = fh.read(SNIFF_BYTES)
    codec, repair = _choose_encoding(head, where, encoding, decoding)
    decoding.encoding = codec
    inner = codecs.getincrementaldecoder(codec)("strict")
    decoder = io.IncrementalNewlineDecoder(inner, translate=True)
    offset, block, pending = 0, head, []  # pending: the pieces of a line not finished yet
    while True:
        final = not block
        state = decoder.getstate()
        start = offset - len(state[0])  # the decoder may hold the first bytes of a character
        try:
            text = decoder.decode(block, final=final)
        except UnicodeDecodeError as e:
            if not repair:
                raise DataSourceError(f"{where}: not valid {codec} at byte {start + e.start} ({e.reason}); "
                                      "set data.encoding to the file's encoding") from None
            decoder.setstate(state)  # this chunk again, its stray bytes escaped, then each read as cp1252
            inner.errors = "surrogateescape"
            text = _ESCAPED.sub(lambda m: _repaired(m, decoding), decoder.decode(block, final=final))
            inner.errors = "strict"
        offset += len(block)
        if "\n" in text:
            lines = text.split("\n")
            pending.append(lines[0])
            lines[0] = "".join(pending)
            pending = [lines.pop()]
            yield from lines
        elif text:
            pending.append(text)
        if final:
            break
        block = fh.read(_CHUNK)
    if rest := "".join(pending):
        yield rest


def _repaired(match: re.Match, decoding: Decoding) -> str:
    decoding.status = "repaired"
    decoding.repaired_bytes += 1
    return _CP1252[ord(match.group())]


def _choose_encoding(head: bytes, where: str, encoding: str, decoding: Decoding) -> tuple[str, bool]:
    """(codec, repair stray bytes as cp1252) for a file that starts with `head`."""
    if encoding != "auto":
        if b"\0" in head and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
            raise RefusedFile(f"{where}: a binary file (NUL bytes), not {encoding} text")
        decoding.status = "declared"
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


def _jsonl(fh, where: str, field: str) -> Iterator[str]:
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{where}:{lineno}: invalid JSON ({e.msg})") from None
        if field not in record:
            raise DataSourceError(f"{where}:{lineno}: no field '{field}' (data.text_field)")
        yield str(record[field])


def _column_batches(batches: Iterator, names: list[str], where: str | Path, field: str) -> Iterator[str]:
    if field not in names:
        raise DataSourceError(f"{where}: no column '{field}' (data.text_field; columns: {', '.join(names)})")
    for batch in batches:
        for value in batch.column(field).to_pylist():
            if value is not None:
                yield str(value)


def _parquet(fh, where: str, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(fh, pre_buffer=False)  # pre-buffering would cache whole column chunks
    except (pa.ArrowInvalid, OSError) as e:
        raise DataSourceError(f"{where}: not a readable Parquet file ({e})") from None
    names = f.schema_arrow.names
    yield from _column_batches(f.iter_batches(batch_size=1024, columns=[field] if field in names else None),
                               names, where, field)


def _hf_saved(root: Path, field: str) -> Iterator[str]:
    """A `datasets` data set written by `save_to_disk`: Arrow IPC stream files listed in
    state.json. Read with pyarrow directly (no `datasets` import needed); for a DatasetDict
    every split is read, in the order its dataset_dict.json lists them."""
    import pyarrow as pa

    if (root / "dataset_dict.json").is_file():
        for split in json.loads((root / "dataset_dict.json").read_text())["splits"]:
            yield from _hf_saved(root / split, field)
        return
    state = json.loads((root / "state.json").read_text())
    for entry in state["_data_files"]:
        arrow = root / entry["filename"]
        try:
            with pa.memory_map(str(arrow)) as source:
                reader = pa.ipc.open_stream(source)
                yield from _column_batches(iter(reader), reader.schema.names, arrow, field)
        except pa.ArrowInvalid as e:
            raise DataSourceError(f"{arrow}: not a readable Arrow file ({e})") from None


def read_images(source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (images float32 in [0, 1] as N x C x H x W, integer labels, number of classes)."""
    if source == "builtin:digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images.astype(np.float32) / 16.0)[:, None]
        return images, d.target.astype(np.int64), 10
    if source.startswith("builtin:"):
        raise DataSourceError(f"data.source: unknown builtin image set '{source}' (known: builtin:digits)")
    fs, path = _filesystem(source)  # local or s3://, like text
    if not fs.exists(path):
        raise DataSourceError(f"data.source: '{source}' does not exist")
    if path.endswith(".npz"):
        images, labels = _read_npz(fs, path, source)
        images = images.astype(np.float32)
        if images.max() > 1.0:
            images = images / (255.0 if images.max() > 16 else 16.0)
        if images.ndim == 3:
            images = images[:, None]
        return images, labels, int(labels.max()) + 1
    if fs.isdir(path):
        return _read_class_folders(fs, path, source)
    raise DataSourceError(f"data.source: '{source}' is neither an .npz file nor a folder of class folders")


def _read_npz(fs, path: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, int64 labels) of an image .npz, checked here so that a damaged archive or bad
    values stop prepare with one line naming the file, not a zipfile traceback or silently
    truncated labels, NaN pixels or a hundred thousand empty classes further on."""
    import zipfile
    import zlib

    try:
        with fs.open(path, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataSourceError(f"{source}: a single .npy array, not an .npz with arrays 'images' and 'labels'")
            with z:
                if "images" not in z or "labels" not in z:
                    raise DataSourceError(f"{source}: an image .npz needs arrays 'images' and 'labels'")
                images, labels = z["images"], z["labels"]
    except DataSourceError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:  # truncated, not a zip, pickled
        raise DataSourceError(f"{source}: not a readable .npz file ({' '.join(str(e).split()) or type(e).__name__})"
                              ) from None
    if images.dtype.kind not in "biuf" or images.ndim not in (3, 4) or images.size == 0:
        raise DataSourceError(f"{source}: 'images' must be a non-empty N x H x W or N x C x H x W array of numbers "
                              f"(got shape {images.shape}, dtype {images.dtype})")
    if images.ndim == 4 and images.shape[1] not in (1, 3, 4):  # (the sample grid and PNGs know these)
        hint = " (channels last? transpose it to N x C x H x W)" if images.shape[-1] in (1, 3, 4) else ""
        raise DataSourceError(f"{source}: 'images' is N x C x H x W with C = 1 (grey), 3 (RGB) or 4 (RGBA) channels; "
                              f"got shape {images.shape}{hint}")
    if images.dtype.kind == "f":
        finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        if not finite.all():
            raise DataSourceError(f"{source}: image {int(np.argmin(finite))} has NaN or infinite pixel values "
                                  f"({int((~finite).sum())} images do)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataSourceError(f"{source}: 'labels' must hold one class id per image ({len(images)}; got shape "
                              f"{labels.shape})")
    if labels.dtype.kind not in "biuf":
        raise DataSourceError(f"{source}: 'labels' must be integer class ids (got dtype {labels.dtype})")
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataSourceError(f"{source}: label {labels[i]} of image {i} is not an integer class id")
    if labels.min() < 0:
        i = int(np.argmin(labels))
        raise DataSourceError(f"{source}: label {labels[i]} of image {i} is negative; class ids are 0, 1, 2, ...")
    if labels.max() >= max(len(labels), MAX_SPARSE_CLASSES):  # (before the cast: a huge label would wrap)
        raise DataSourceError(f"{source}: largest label {labels.max()} means {int(labels.max()) + 1:,} classes, more "
                              f"than the {len(labels):,} images; labels must be class ids 0..K-1")
    return images, labels.astype(np.int64)


def _read_class_folders(fs, root: str, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    from PIL import Image

    classes = sorted(Path(p).name for p in fs.ls(root, detail=False)  # (not .ipynb_checkpoints, __MACOSX)
                     if fs.isdir(p) and not Path(p).name.startswith((".", "__")))
    if not classes:
        raise DataSourceError(f"{source}: expected one sub-folder per class")
    protocol = f"{source.split('://')[0]}://" if "://" in source else ""
    images, labels, names = [], [], []
    mode: str | None = None
    for idx, cls in enumerate(classes):
        folder = f"{root.rstrip('/')}/{cls}"
        files = [f for f in sorted(fs.ls(folder, detail=False)) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataSourceError(f"{protocol}{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found under this "
                                  "class folder")
        for f in files:
            try:
                with fs.open(f, "rb") as fh, Image.open(fh) as im:
                    if mode is None:  # the first image decides: colour stays colour (C = 3), else grey
                        mode = "RGB" if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "L"
                    img = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
            except Image.UnidentifiedImageError:  # its message names fsspec's file object, not the file
                raise DataSourceError(f"{protocol}{f}: not an image PIL can read") from None
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, damaged
                raise DataSourceError(f"{protocol}{f}: not a readable image ({e})") from None
            images.append(img if mode == "L" else img.transpose(2, 0, 1))
            labels.append(idx)
            names.append(f"{protocol}{f}")
    odd = next((i for i, img in enumerate(images) if img.shape != images[0].shape), None)
    if odd is not None:
        raise DataSourceError(f"{names[odd]}: size {images[odd].shape[-2:]} differs from {names[0]}'s "
                              f"{images[0].shape[-2:]}; images differ in size, resize them first")
    stacked = np.stack(images)
    return (stacked[:, None] if mode == "L" else stacked), np.asarray(labels, dtype=np.int64), len(classes)
