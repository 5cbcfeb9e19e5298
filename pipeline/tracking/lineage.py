"""Where a run came from: code commit, DVC hashes of its inputs, package versions."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml


def git_state(cwd: Path | str = ".") -> dict[str, str]:
    """Commit and whether the work tree differs from it (`dirty_files`); 'unknown' outside a git
    checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = dirty_files(cwd)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def dirty_files(cwd: Path | str = ".") -> list[str]:
    """Tracked files with uncommitted changes, bar those `dvc repro` itself rewrites (dvc.lock, the
    .gitignore files naming its outputs): what they record is compared through dvc.lock's hashes,
    and the train stage runs after `dvc repro` rewrote dvc.lock for the stages before it (a clean
    checkout was tagged as trained from uncommitted changes). Raises CalledProcessError outside a
    git checkout."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                         text=True, check=True).stdout
    paths = [line[3:] for line in out.splitlines()]
    return [p for p in paths if p != "dvc.lock" and Path(p).name != ".gitignore"]


def dvc_lock_hashes(lock: Path | str = "dvc.lock") -> dict[str, str]:
    """md5 of every dep and out of every stage recorded in dvc.lock, keyed `dvc.<stage>.<path>`
    (with `stage@item` written `stage:item`)."""
    lock = Path(lock)
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    out = {}
    for stage, entry in (data.get("stages") or {}).items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind, []) or []:
                if "md5" in item:  # MLflow refuses '@' in keys: foreach stage "train@lm" becomes "train:lm"
                    out[f"dvc.{stage.replace('@', ':')}.{item['path']}"] = item["md5"]
    return out


def environment() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "ray", "mlflow", "dvc", "deepspeed", "horovod", "onnxruntime"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {f"env.{k}": v for k, v in versions.items()}


def run_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    return {**git_state(), **environment(), **{k: str(v) for k, v in (extra or {}).items()}}


def weights_fingerprint(path: Path, full_below: int = 2 << 30, block: int = 1 << 20) -> str:
    """A sha256 naming the initial weights a run started from (`init_from`): a safetensors
    file, or a folder (its config and tokenizer files and every safetensors file).

    Up to `full_below` bytes of weights are hashed whole (a few seconds). Larger checkpoints are
    fingerprinted by their names, sizes, safetensors headers (every tensor's name, dtype, shape
    and offset) and one 1 MiB block every 256 MiB of data, so a 7B checkpoint costs a second,
    not minutes; a change confined to the bytes between sampled blocks is not seen."""
    import hashlib

    from pipeline.data.fingerprint import weights_files

    files = weights_files(Path(path))
    total = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with p.open("rb") as fh:
            if p.suffix != ".safetensors" or total <= full_below:
                while chunk := fh.read(block):
                    h.update(chunk)
                continue
            header = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(header))
            for offset in range(8 + header, p.stat().st_size, 256 * block):
                fh.seek(offset)
                h.update(fh.read(block))
    return h.hexdigest()
