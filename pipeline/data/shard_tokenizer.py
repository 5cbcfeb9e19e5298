"""The tokenizer beside a text shard folder, as the shards were written with it.

Training reads token ids only, so nothing before evaluation opens `tokenizer.json`; evaluation
decodes with it and export ships it inside the model (and its Hugging Face folder and MLflow
model). A file swapped, truncated or deleted after the shard stage would otherwise give garbage
samples, a model paired with another vocabulary, or a tokenizers traceback without a path. The
manifest records the file's sha256 (`tokenizer_sha256`); every reader goes through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic import file_sha256
from pipeline.data.shard_format import ShardError, load_manifest

TOKENIZER = "tokenizer.json"
RESHARD = "rerun the shard stage (`dvc repro` does)"


def checked_tokenizer(shards: Path) -> Path | None:
    """The folder's `tokenizer.json`, checked against the manifest's `tokenizer_sha256`; None for
    shards that have no tokenizer (images). Raises `ShardError` naming the file."""
    path = Path(shards) / TOKENIZER
    want = load_manifest(shards).get("tokenizer_sha256")
    if want is None:
        return path if path.is_file() else None
    if not path.is_file():
        raise ShardError(f"{path} is missing: the tokenizer the shards were written with; {RESHARD}")
    if file_sha256(path) != want:
        raise ShardError(f"{path} is not the tokenizer the shards were written with (its sha256 differs from the "
                         f"manifest's tokenizer_sha256); {RESHARD}")
    return path


def load_tokenizer(shards: Path) -> Any:
    """The checked tokenizer as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    path = checked_tokenizer(shards)
    if path is None:
        raise ShardError(f"{Path(shards) / TOKENIZER} is missing: these shards have no tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception subclasses, and names no file
        raise ShardError(f"{path} is not a readable tokenizer ({str(e).splitlines()[0]}); {RESHARD}") from None
