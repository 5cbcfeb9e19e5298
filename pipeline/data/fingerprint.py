"""What the prepare stage reads, as a small JSON record that changes when the data does.

DVC decides whether `prepare@<task>` reruns from its deps and params, and `data.source` is a
*value* in params.yaml: the folder or s3:// prefix it names is nobody's dependency, so editing a
file in it left `dvc repro` saying "didn't change, skipping" and the manifest's `raw_sha256`
describing data that no longer existed. DVC cannot template a dependency from a param's value,
so the `source@<task>` stage (always run) writes this record to `data/<task>/source.json` and
prepare depends on that file: an unchanged source rewrites the same bytes and prepare is
skipped; an edited one changes them and prepare reruns.

What is recorded: the sha256 of every local file prepare reads (text: the files `text_units`
lists; images: the .npz or every image of the class folders), contents, not mtimes, so a fresh
clone or `dvc pull` does not look changed; hashed once per (size, mtime, inode) in a cache under
`.dvc/tmp`, as DVC's own state does, so a large unchanged source costs a listing. A remote
object's ETag or checksum (nothing is downloaded, unless the store gives neither and no
modification time); the version of what makes a builtin set; and the tokenizer files of a
`model.init_from` checkpoint (prepare copies them).

The same stage writes a second record, `data/<task>/init_from.json`, for the train stage: the
sha256 of each file of the weights training starts from (`model.init_from` or `trainer.init_from`),
so weights replaced in place at the same path retrain the model, as other data does. (That
record is the train stage's and not prepare's: new weights with the same tokenizer prepare the
same data.)

A source this machine cannot read (a folder not here, an s3:// prefix without network or
credentials) raises `SourceUnavailable`: the stage then keeps the record it has, so a machine
with the prepared data but not the raw data (`dvc pull`, a queued experiment's copy) does not
rerun prepare for nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_text
from pipeline.data.image_sources import IMAGE_SUFFIXES
from pipeline.data.sources import DataSourceError, _junk, _local_files, filesystem, text_units
from pipeline.data.text import HF_TOKENIZER_FILES

_BLOCK = 1 << 22
CACHE = Path(".dvc/tmp/pipeline-source-hashes.json")  # (DVC keeps .dvc/tmp out of git)
# what an object store or remote file system gives as a content checksum in `info`
_CHECKSUMS = ("ETag", "etag", "md5", "md5Hash", "checksum", "crc32c", "blob_id", "xet_hash")


class SourceUnavailable(DataSourceError):
    """The source cannot be read on this machine (not here, no network, no credentials)."""


class _Hashes:
    """sha256 of local files, cached by path, size, mtime and inode (a file changed in place gets a
    new mtime; a replaced one a new inode)."""

    def __init__(self, cache: Path | None) -> None:
        self.cache = cache
        try:
            known = json.loads(cache.read_text()) if cache and cache.is_file() else {}
        except (OSError, ValueError):
            known = {}
        # (a cache another writer left as something else is no cache)
        self.known: dict[str, list] = {k: v for k, v in known.items() if isinstance(v, list) and len(v) == 4} \
            if isinstance(known, dict) else {}
        self.used: dict[str, list] = {}

    def __call__(self, path: str) -> str:
        st = os.stat(path)
        key, stamp = os.path.realpath(path), [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.known.get(key)
        if entry is None or entry[:3] != stamp:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(_BLOCK):
                    h.update(block)
            entry = [*stamp, h.hexdigest()]
        self.used[key] = entry
        return entry[3]

    def save(self) -> None:
        if self.cache is not None and self.cache.parent.is_dir() and self.used != self.known:
            atomic_write_text(self.cache, json.dumps({**self.known, **self.used}))


def _builtin(source: str) -> dict[str, str]:
    """What a builtin set's contents depend on: the interpreter whose docs and standard library
    are the text, scikit-learn's copy of the digits."""
    if source == "builtin:python-docs":
        return {"python": platform.python_version()}
    if source == "builtin:digits":
        import sklearn

        return {"scikit-learn": sklearn.__version__}
    return {}  # (an unknown builtin is prepare's one-line error)


def _read_files(source: str, kind: str) -> list[str]:
    """The files prepare reads from a local source: for text, those `text_units` lists (a Hugging
    Face `datasets` folder: every file in it); for images, the .npz or the class folders' images."""
    path = source.removeprefix("file://")
    if not os.path.exists(path):
        raise SourceUnavailable(f"data.source: '{source}' is not on this machine")
    if kind == "text":  # (a file:// source's units as paths, which the hashing opens)
        units = text_units(path)
        return [f for u in units for f in (sorted(_local_files(Path(u))) if os.path.isdir(u) else [u])]
    if os.path.isdir(path):
        return sorted(f for f in _local_files(Path(path)) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return [path]


def _local(source: str, kind: str, hashes: _Hashes) -> dict[str, str]:
    path = source.removeprefix("file://")
    base = path if os.path.isdir(path) else os.path.dirname(path)
    return {os.path.relpath(f, base): hashes(f) for f in _read_files(source, kind)}


def _remote(source: str) -> dict[str, str]:
    """Each object's checksum (an ETag, an md5...), else its size and modification time, else (a
    store that gives neither) its contents' sha256."""
    fs, path = filesystem(source)
    try:
        if not fs.exists(path):
            raise SourceUnavailable(f"data.source: '{source}' does not exist")
        found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
        out = {}
        for name, info in sorted(found.items()):
            relative = name[len(path):].lstrip("/") or Path(name).name
            if _junk("/" + relative):
                continue
            lfs = info.get("lfs") if isinstance(info.get("lfs"), dict) else {}
            tag = next((info[k] for k in _CHECKSUMS if info.get(k)), None) or lfs.get("sha256")
            when = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
            if tag:
                out[relative] = str(tag)
            elif when:
                out[relative] = f"{info.get('size')}:{when}"
            else:
                out[relative] = "sha256:" + hashlib.sha256(fs.cat_file(name)).hexdigest()
        return out
    except DataSourceError:
        raise
    except Exception as e:  # (no network, no credentials: botocore's errors are no OSError)
        raise SourceUnavailable(f"data.source: cannot list '{source}' here ({type(e).__name__}: {e})") from None


def source_fingerprint(source: str, kind: str = "text", tokenizer_from: str | None = None,
                       cache: Path | None = CACHE) -> dict[str, Any]:
    """The record of what prepare will read for this `data.source` of `kind` (text or images)
    and `model.init_from`. Raises `SourceUnavailable` when it cannot be read here."""
    record: dict[str, Any] = {"source": source}
    hashes = _Hashes(cache)
    if source.startswith("builtin:"):
        record["builtin"] = _builtin(source)
    elif "://" in source and not source.startswith("file://"):
        record["objects"] = _remote(source)
    else:
        record["files"] = _local(source, kind, hashes)
    if tokenizer_from:
        folder = Path(tokenizer_from)
        record["tokenizer_from"] = {name: hashes(str(folder / name)) for name in HF_TOKENIZER_FILES
                                    if (folder / name).is_file()}
    hashes.save()
    return record


def weights_files(path: Path) -> list[Path]:
    """The files that make the weights at `path` (`init_from`): a safetensors file itself, or a
    folder's config, tokenizer and safetensors files."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".jinja"))


def init_fingerprint(init_from: str | None, cache: Path | None = CACHE) -> dict[str, Any]:
    """The record of the weights training starts from: each of `weights_files`' sha256 (hashed
    once per size, mtime and inode, as the source's files); `{"init_from": None}` without any.
    Raises `SourceUnavailable` when they are not on this machine."""
    if not init_from:
        return {"init_from": None}
    path = Path(init_from)
    if not path.exists():
        raise SourceUnavailable(f"init_from: '{init_from}' is not on this machine")
    hashes = _Hashes(cache)
    files = {p.name: hashes(str(p)) for p in weights_files(path)}
    hashes.save()
    return {"init_from": init_from, "files": files}


def _write(out: Path, compute: Callable[[], dict[str, Any]], unavailable: dict[str, Any],
           kept: str = "") -> tuple[dict[str, Any] | None, str | None]:
    """`compute()`'s record as JSON in `out`, atomically (the file is left alone when its bytes would
    not change). Where `compute` raises `SourceUnavailable`, the record there is stays (None and the
    line saying so, with `kept` after it); without one, `unavailable` is recorded with the reason.
    Returns (the record written, the line to print instead of the stage's own, if any)."""
    try:
        record = compute()
    except SourceUnavailable as e:
        if out.is_file():
            return None, f"{e}: kept the record of {out}{kept}"
        record = {**unavailable, "unavailable": str(e)}
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if not (out.is_file() and out.read_text() == text):
        atomic_write_text(out, text)
    return record, (f"{record['unavailable']}: recorded as unavailable" if "unavailable" in record else None)


def write_init_record(init_from: str | None, out: Path) -> str:
    """Write `init_fingerprint`'s record to `out`; returns the line the stage prints. Weights not on
    this machine keep the record there is (the train stage keeps its model); without one they are
    recorded as unavailable, and training names the missing path."""
    record, said = _write(out, lambda: init_fingerprint(init_from), {"init_from": init_from})
    if said is not None or record is None:
        return said or ""
    n = len(record.get("files", {}))
    return f"init_from {init_from}: {n} file{'s' * (n != 1)} hashed" if init_from else "no init_from"


def write_record(source: str, kind: str, tokenizer_from: str | None, out: Path) -> str:
    """Write the record to `out` (atomically; unchanged bytes when nothing changed); returns the
    line the stage prints. A source not readable here keeps the record there is, with a warning
    (prepare then keeps its output); without one, it is recorded as unavailable, so prepare runs
    and names the problem."""
    start = time.perf_counter()
    record, said = _write(out, lambda: source_fingerprint(source, kind, tokenizer_from), {"source": source},
                          " (prepare keeps its output)")
    if said is not None or record is None:
        return said or ""
    if "builtin" in record:
        what = "builtin " + ", ".join(f"{k} {v}" for k, v in record["builtin"].items())
    else:
        n = len(record.get("files", record.get("objects", {})))
        what = f"{n} file{'s' * (n != 1)} {'hashed' if 'files' in record else 'listed'}"
    return f"{source}: {what} in {time.perf_counter() - start:.1f} s"
