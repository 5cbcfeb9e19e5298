"""Raw inputs: the bundled defaults and the user's own files.

Defaults are real data that ship offline: CPython's Language Reference (`pydoc_data.topics`)
and standard-library docstrings, part of every Python install, and scikit-learn's 8x8
handwritten digits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".rst")


class DataSourceError(ValueError):
    """The configured source does not exist or has an unsupported format."""


def _paragraphs(text: str) -> Iterator[str]:
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if block.strip():
            yield block


def _python_docs() -> Iterator[str]:
    """CPython's Language Reference (pydoc topics) and the docstrings of the standard library.

    Both ship with every Python install. Docstrings are read with `ast`, never by importing
    modules (some have side effects on import).
    """
    import ast
    import sysconfig
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from _paragraphs(topics[name])
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


def read_text_documents(source: str, jsonl_field: str = "text") -> Iterator[str]:
    """Yield documents (paragraphs for plain text, records for JSONL) in a stable order."""
    if source == "builtin:python-docs":
        yield from _python_docs()
        return
    if source.startswith("builtin:"):
        raise DataSourceError(f"data.source: unknown builtin text '{source}' (known: builtin:python-docs)")
    path = Path(source)
    if not path.exists():
        raise DataSourceError(f"data.source: '{source}' does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    used = [p for p in files if p.suffix in (*TEXT_SUFFIXES, ".jsonl")]
    if not used:
        raise DataSourceError(f"data.source: no .txt/.md/.rst/.jsonl files under '{source}'")
    for p in used:
        if p.suffix == ".jsonl":
            with p.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataSourceError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
                    if jsonl_field not in record:
                        raise DataSourceError(f"{p}:{lineno}: no field '{jsonl_field}' (data.jsonl_field)")
                    yield str(record[jsonl_field])
        else:
            yield from _paragraphs(p.read_text(encoding="utf-8", errors="replace"))


def read_images(source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (images float32 in [0, 1] as N x C x H x W, integer labels, number of classes)."""
    if source == "builtin:digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images.astype(np.float32) / 16.0)[:, None]
        return images, d.target.astype(np.int64), 10
    if source.startswith("builtin:"):
        raise DataSourceError(f"data.source: unknown builtin image set '{source}' (known: builtin:digits)")
    path = Path(source)
    if not path.exists():
        raise DataSourceError(f"data.source: '{source}' does not exist")
    if path.suffix == ".npz":
        with np.load(path) as z:
            if "images" not in z or "labels" not in z:
                raise DataSourceError(f"{path}: an image .npz needs arrays 'images' and 'labels'")
            images, labels = z["images"], z["labels"].astype(np.int64)
        images = images.astype(np.float32)
        if images.max() > 1.0:
            images = images / (255.0 if images.max() > 16 else 16.0)
        if images.ndim == 3:
            images = images[:, None]
        return images, labels, int(labels.max()) + 1
    if path.is_dir():
        return _read_class_folders(path)
    raise DataSourceError(f"data.source: '{source}' is neither an .npz file nor a folder of class folders")


def _read_class_folders(root: Path) -> tuple[np.ndarray, np.ndarray, int]:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataSourceError(f"{root}: expected one sub-folder per class")
    images, labels = [], []
    for idx, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
                continue
            img = np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0
            images.append(img)
            labels.append(idx)
    shapes = {i.shape for i in images}
    if len(shapes) != 1:
        raise DataSourceError(f"{root}: images differ in size {sorted(shapes)}; resize them first")
    return np.stack(images)[:, None], np.asarray(labels, dtype=np.int64), len(classes)
