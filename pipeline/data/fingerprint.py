"""What the prepare stage reads, as a small JSON record that changes when the data does.

DVC decides whether `prepare@<task>` reruns from its deps and params, and `data.source` is a
*value* in params.yaml: the folder or s3:// prefix it names is nobody's dependency, so editing a
file in it left `dvc repro` saying "didn't change, skipping" and the manifest's `raw_sha256`
describing data that no longer existed. DVC cannot template a dependency from a param's value,
so the `source@<task>` stage (always run, seconds) writes this record to `data/<task>/source.json`
and prepare depends on that file: an unchanged source rewrites the same bytes and prepare is
skipped; an edited one changes them and prepare reruns.

What is recorded: every local file's sha256 (contents, not mtimes: a fresh clone or `dvc pull`
must not look changed), a remote object's ETag (or checksum, or size and modification time:
nothing is downloaded), the version of what makes a builtin set, and the tokenizer files of a
`model.init_from` checkpoint (prepare copies them). A local folder records every file below
it, hidden and system entries aside, as the sources read it (`_local_files`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any

from pipeline.data.sources import DataSourceError, _junk, _local_files, filesystem
from pipeline.data.text import HF_TOKENIZER_FILES

_BLOCK = 1 << 22


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _builtin(source: str) -> dict[str, str]:
    """What a builtin set's contents depend on: the interpreter whose docs and standard library
    are the text, scikit-learn's copy of the digits."""
    if source == "builtin:python-docs":
        return {"python": platform.python_version()}
    if source == "builtin:digits":
        import sklearn

        return {"scikit-learn": sklearn.__version__}
    return {}  # (an unknown builtin is prepare's one-line error)


def _local(path: Path) -> dict[str, str]:
    if path.is_dir():
        files = sorted(_local_files(path))
        return {os.path.relpath(f, path): _sha256(f) for f in files}
    return {path.name: _sha256(str(path))}


def _remote(source: str) -> dict[str, str]:
    """Each object's ETag (s3, gcs), else its checksum, else size and modification time."""
    fs, path = filesystem(source)
    try:
        if not fs.exists(path):
            return {}  # (prepare names it)
        found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    except OSError as e:  # (no credentials, no permission, no network)
        raise DataSourceError(f"data.source: cannot list '{source}' ({e})") from None
    out = {}
    for name, info in sorted(found.items()):
        relative = name[len(path):].lstrip("/") or Path(name).name
        if _junk("/" + relative):
            continue
        tag = info.get("ETag") or info.get("etag") or info.get("md5") or info.get("checksum")
        out[relative] = str(tag) if tag else f"{info.get('size')}:{info.get('LastModified') or info.get('mtime')}"
    return out


def source_fingerprint(source: str, tokenizer_from: str | None = None) -> dict[str, Any]:
    """The record of what prepare will read for this `data.source` (and `model.init_from`)."""
    record: dict[str, Any] = {"source": source}
    if source.startswith("builtin:"):
        record["builtin"] = _builtin(source)
    elif "://" in source and not source.startswith("file://"):
        record["objects"] = _remote(source)
    else:
        path = Path(source.removeprefix("file://"))
        record["files"] = _local(path) if path.exists() else {}  # (a missing source is prepare's error)
    if tokenizer_from:
        folder = Path(tokenizer_from)
        record["tokenizer_from"] = {name: _sha256(str(folder / name)) for name in HF_TOKENIZER_FILES
                                    if (folder / name).is_file()}
    return record


def describe(record: dict[str, Any], seconds: float) -> str:
    """One line for the stage's log."""
    if "builtin" in record:
        what = "builtin " + ", ".join(f"{k} {v}" for k, v in record["builtin"].items())
    else:
        n = len(record.get("files", record.get("objects", {})))
        what = f"{n} file{'s' * (n != 1)} {'hashed' if 'files' in record else 'listed'}"
    return f"{record['source']}: {what} in {seconds:.1f} s"


def timed_fingerprint(source: str, tokenizer_from: str | None = None) -> tuple[dict[str, Any], str]:
    start = time.perf_counter()
    record = source_fingerprint(source, tokenizer_from)
    return record, describe(record, time.perf_counter() - start)
