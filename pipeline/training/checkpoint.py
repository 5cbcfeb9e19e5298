"""Training checkpoints and final model artifacts.

A checkpoint directory holds the strategy's training state (its own layout: `state.pt` for
the replicated backends, a DCP directory for FSDP, a DeepSpeed checkpoint), optionally
`model.safetensors` (consolidated fp32 weights, in the final checkpoint), one checksum file
per rank (`files-rank<r>.json`: size and sha256 of every file that rank wrote) and `meta.json`
(step, data reader position, metric history, how many ranks wrote files). `meta.json` is
written last: a directory without it is incomplete and is never loaded. Ranks write their
parts into directories of their own (Ray Train merges them), so each rank records its own
files and no rank needs to see another's.

A model folder (`models/<task>/`, `export/<task>/`) holds `checksums.json` beside its files.
Every checkpoint and model is checked against its checksums before it is loaded, and a damaged
file is named (`DamagedFile`, a one-line error).
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline.atomic import (
    as_open_creates,
    atomic_dir,
    atomic_write_text,
    check_file,
    checksum_record,
    describe_file,
    describe_files,
    json_digest,
    read_checksum_record,
)
from pipeline.distributed.replicated import STATE  # the replicated backends' state file (its one home)
from pipeline.safetensors_stream import drain_or_write

if TYPE_CHECKING:
    from pipeline.distributed.base import Strategy

META, WEIGHTS, SPEC = "meta.json", "model.safetensors", "model_spec.json"
CHECKSUMS = "checksums.json"  # in a model folder
RANK_FILES = "files-rank{}.json"  # in a checkpoint, one per rank
_RECORDS = re.compile(r"(meta\.json|files-rank\d+\.json)$")


class CheckpointError(RuntimeError):
    pass


class DamagedFile(CheckpointError):
    """A file that no longer matches what was recorded when it was written (or cannot be read)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path} is damaged ({reason})")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # crosses from Ray workers to the driver
        return type(self), (self.path, self.reason)


class CannotReshard(CheckpointError):
    """A checkpoint written by another number of ranks than this run's, under a backend whose
    state cannot be redistributed: retrying on the same workers cannot help."""


class StorageFull(CheckpointError):
    """A checkpoint did not fit where it was written: retrying cannot help until space is freed."""


class StorageNotShared(CheckpointError):
    """Ranks that must write into one folder do not all see it (a local path on several hosts):
    retrying on the same hosts cannot help."""


# --- checkpoints --------------------------------------------------------------------------

def write_weights(directory: Path | None, strategy: Strategy, state: dict[str, torch.Tensor] | None = None) -> None:
    """The export weights of a final checkpoint (`model.safetensors`, fp32): the strategy's
    `full_tensors` (the model's weights, or `state` in its EMA layout) gathered one tensor at a
    time and streamed into the file by rank 0 (`directory` given), so the whole model is never
    in one process. Every rank calls it (the gathers are collectives); the others pass None."""
    shapes = strategy.full_shapes(state)
    specs = {k: (torch.float32, shape) for k, shape in shapes.items()}
    drain_or_write(None if directory is None else directory / WEIGHTS, specs, strategy.full_tensors(state))


def seal_checkpoint(directory: Path, rank: int, world: int, meta: dict[str, Any] | None = None) -> int:
    """Every rank, after the strategy has saved its part into `directory` (and rank 0 the export
    weights of a final checkpoint, `write_weights`): each rank records its files' sizes and
    sha256 in `files-rank<r>.json`; rank 0 writes the marker `meta.json` last, which says how
    many such records belong to the checkpoint. Returns the bytes of this rank's part."""
    directory.mkdir(parents=True, exist_ok=True)
    files = describe_files(directory, skip=lambda name: bool(_RECORDS.match(name)))
    atomic_write_text(directory / RANK_FILES.format(rank), checksum_record(files, rank=rank))
    if meta is not None:
        body = {**meta, "ranks": world}
        atomic_write_text(directory / META, json.dumps({**body, "sha256": json_digest(body)}))
    return sum(f["size"] for f in files.values())


def read_meta(directory: Path) -> dict[str, Any]:
    """The small part of a checkpoint (step, reader position, history), without loading any tensors."""
    path = directory / META
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete (no {META}); refusing to load it")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFile(path, f"not valid JSON: {e}") from e
    if "sha256" in meta and json_digest({k: v for k, v in meta.items() if k != "sha256"}) != meta["sha256"]:
        raise DamagedFile(path, "its own digest does not match its contents")
    return meta


_verified: dict[str, tuple] = {}  # checkpoint -> (name, size, mtime) of its files when last found intact


def _signature(directory: Path) -> tuple:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return tuple((p.relative_to(directory).as_posix(), s.st_size, s.st_mtime_ns) for p in files for s in [p.stat()])


def verify_checkpoint(directory: Path) -> None:
    """Raise `DamagedFile` naming the first file of a checkpoint that does not match its rank's
    record (or a record that is missing or damaged). A checkpoint from before checksums were
    recorded (no `ranks` in its meta) has nothing to be checked against and passes."""
    if not (directory / META).is_file():
        raise DamagedFile(directory / META, "missing")
    meta = read_meta(directory)
    ranks = meta.get("ranks")
    if ranks is None:
        return
    key, signature = str(directory.resolve()), _signature(directory)
    if _verified.get(key) == signature:
        return
    expected: dict[str, list[dict[str, Any]]] = {}
    for r in range(int(ranks)):
        record = read_checksum_record(directory / RANK_FILES.format(r))
        if isinstance(record, str):
            raise DamagedFile(directory / RANK_FILES.format(r), record)
        for name, entry in record.items():
            expected.setdefault(name, []).append(entry)  # a name two ranks wrote may match either
    for size_only in (True, False):  # sizes first: cheap, and what a truncation changes
        for name in sorted(expected):
            if why := check_file(directory / name, expected[name], size_only):
                raise DamagedFile(directory / name, why)
    _verified[key] = signature


def load_training_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`state.pt` and meta of a replicated-strategy (DDP, Horovod) checkpoint, for inspection."""
    meta = read_meta(directory)
    return torch.load(directory / STATE, map_location="cpu", weights_only=True), meta


# --- a full disk ----------------------------------------------------------------------------

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "File too large")


def free_bytes(where: Path | str) -> int | None:
    try:
        return shutil.disk_usage(where).free
    except (OSError, ValueError):
        return None


def dir_bytes(directory: Path | str) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def out_of_space(exc: BaseException, where: Path | str, need: int = 0) -> bool:
    """Whether a failed write failed for want of space (ENOSPC, a quota, a file-size limit).
    torch's zip writer reports a short write without an errno ("unexpected pos ..."): a failed
    write on a file system with less room left than the write needs counts too."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if any(text in str(seen) for text in _FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(where)
    return isinstance(exc, OSError | RuntimeError) and free is not None and free < max(need, 16 << 20)


def storage_full(where: Path | str, step: int, need: int, qualifier: str = "", local: bool = False) -> StorageFull:
    """The one-line error for a checkpoint that did not fit: the place, and the bytes it needs
    (`qualifier` "about " or "more than " when they are not known exactly). `local`: the place
    is the local directory a rank saves its part into before it is stored."""
    free = free_bytes(where)
    room = f", {free:,} bytes free there" if free is not None else ""
    fix = ("Free some space there (or point TMPDIR at a larger file system) and rerun" if local else
           "Free some space (or lower trainer.keep_last_k) and rerun")
    return StorageFull(f"no space left on device writing the step-{step} checkpoint to {where}: this rank's part "
                       f"needs {qualifier}{need:,} bytes{room}. {fix}: training resumes from the last complete "
                       "checkpoint")


# --- model folders ----------------------------------------------------------------------------

def write_model(out_dir: Path, weights: dict[str, torch.Tensor] | Path, spec: dict[str, Any],
                extra: dict[str, str] | None = None) -> None:
    """Weights as safetensors plus the model spec and the checksums of both, swapped into place
    in one rename. `weights` may be a safetensors file (a final checkpoint's), copied as it is:
    the weights are never loaded, so no process needs the whole model in memory for this."""
    with atomic_dir(out_dir) as tmp:
        if isinstance(weights, Path):
            shapes = safetensors_shapes(weights)  # a readable header, and data of the size it announces
            shutil.copyfile(weights, tmp / WEIGHTS)
            if not shapes:
                raise DamagedFile(weights, "it holds no tensors")
        else:
            save_file(weights, str(tmp / WEIGHTS))
            as_open_creates(tmp / WEIGHTS)
        (tmp / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        write_checksums(tmp)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors file's header (nothing else is read); `DamagedFile`
    if the file is not a readable safetensors file."""
    try:
        with safe_open(str(path), "pt") as f:
            names = f.keys()  # (a safe_open handle is not iterable)
            return {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except (SafetensorError, OSError) as e:
        raise DamagedFile(path, f"not a readable safetensors file: {str(e).splitlines()[0]}") from e


def write_checksums(directory: Path, add: tuple[str, ...] = ()) -> None:
    """Record size and sha256 of every file in a model folder (`checksums.json`). With `add`, only
    those files are described, into the folder's existing record (the others were hashed already)."""
    if add:
        files = model_checksums(directory)
        files.update({name: describe_file(directory / name) for name in add})
    else:
        files = describe_files(directory, skip=lambda name: name == CHECKSUMS)
    atomic_write_text(directory / CHECKSUMS, checksum_record(files))


def model_checksums(model_dir: Path) -> dict[str, dict[str, Any]]:
    """The files a model folder's `checksums.json` lists (size, sha256), or `DamagedFile`: every
    model and export folder this project writes has one, so a missing one is damage too."""
    record = read_checksum_record(model_dir / CHECKSUMS)
    if isinstance(record, str):
        raise DamagedFile(model_dir / CHECKSUMS, record + ("; the folder cannot be verified (every model "
                                                           "folder the stages write has one)" if record == "missing"
                                                           else ""))
    return record


def verify_model_dir(model_dir: Path, required: bool = True,
                     hashed: Callable[[str], bool] = lambda name: True) -> bool:
    """Raise `DamagedFile` for the first file of a model folder that does not match
    `checksums.json`: every listed file's size, then the sha256 of those `hashed` selects (all
    unless a reader says which it reads). A folder without a record is damaged if `required`
    (the stages' own folders); otherwise (weights a user brings: a `transformers` folder) False:
    nothing to compare with."""
    if not required and not (model_dir / CHECKSUMS).exists():
        return False
    record = model_checksums(model_dir)
    for size_only in (True, False):
        for name in sorted(record):
            if not size_only and not hashed(name):
                continue
            if why := check_file(model_dir / name, [record[name]], size_only):
                raise DamagedFile(model_dir / name, why)
    return True


def read_by_loaders(name: str) -> bool:
    """The files of a model or export folder that loading it reads (`load_model`, the served
    pyfunc): those at its top, bar the ONNX graphs. The `transformers` copy (`hf/`) and the ONNX
    files are only size-checked there (each is hashed where it is checked in full: at register)."""
    return "/" not in name and not name.startswith(("model.onnx", "model.int8.onnx"))


def read_json(path: Path, made_by: str) -> Any:
    """A JSON record a stage wrote (`made_by`: the stage that writes it), or one line naming the
    file: missing, or damaged, with the stage to run again."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the {made_by} stage first")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFile(path, f"not valid JSON: {e}; run the {made_by} stage again") from None


def record_string(record: Any, path: Path, key: str, made_by: str) -> str:
    """`record[key]` of a JSON record a stage wrote, a non-empty string, or one line naming the file
    and the key (a record the stage did not write: a list, a missing key, a number)."""
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value:
        raise DamagedFile(path, f"no '{key}' string in it; run the {made_by} stage again")
    return value


def read_model(model_dir: Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model folder's weights and spec, its files checked against `checksums.json` first
    (`verify=False`: a folder its writer has just recorded)."""
    for name in (WEIGHTS, SPEC):
        if not (model_dir / name).is_file():
            raise CheckpointError(f"{model_dir / name} is missing: run the train stage first")
    if verify:
        verify_model_dir(model_dir, hashed=read_by_loaders)
    try:
        weights = load_file(str(model_dir / WEIGHTS))
    except (SafetensorError, OSError) as e:  # (damaged after the check, or not verified)
        raise DamagedFile(model_dir / WEIGHTS, f"not a readable safetensors file: {str(e).splitlines()[0]}") from e
    try:
        spec = json.loads((model_dir / SPEC).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFile(model_dir / SPEC, f"not valid JSON: {e}") from e
    return weights, spec


def load_model(model_dir: Path, verify: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained model (eval mode) from its directory.

    The model is built on the meta device and the file's tensors become its parameters
    (`assign`): the weights are in memory once, not twice (a random initialisation overwritten
    by a copy), and no time goes into drawing that initialisation (minutes at 7B on CPUs). They
    are the file's pages (safetensors maps it, privately: an in-place change stays in memory),
    read as they are used. Tied weights are tied again; buffers the file does not hold (RoPE
    tables) are recomputed."""
    from pipeline.distributed.pipeline_parallel import retie, tie_groups
    from pipeline.tasks import task_for_spec

    weights, spec = read_model(model_dir, verify)
    if spec.get("model", {}).get("norm_impl") == "apex":  # same weights; inference needs no apex
        spec = {**spec, "model": {**spec["model"], "norm_impl": "torch"}}
    with torch.device("meta"):
        model = task_for_spec(spec).build(spec)
    ties = tie_groups(model)
    model.load_state_dict(weights, assign=True)
    del weights
    retie(model, ties)  # assign gave each name of a tied pair its own tensor (equal: both were saved)
    if any(b.is_meta for b in model.buffers()) and hasattr(model, "init_buffers"):
        model.init_buffers()
    if left := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise CheckpointError(f"{model_dir / WEIGHTS} does not hold {', '.join(left[:5])} and the model cannot "
                              "recompute it")
    return model.eval(), spec



def newest_intact(candidates: list[Path]) -> tuple[Path | None, list[DamagedFile]]:
    """The first of `candidates` (newest first) that verifies, and what was found damaged before it."""
    damaged = []
    for directory in candidates:
        try:
            verify_checkpoint(directory)
            return directory, damaged
        except DamagedFile as e:
            damaged.append(e)
    return None, damaged


def fallback_line(damaged: list[DamagedFile], step: int, directory: Path | str) -> str:
    """One line for a resume that passes over damaged checkpoints."""
    more = f" (and {len(damaged) - 1} older checkpoint(s))" if len(damaged) > 1 else ""
    first = damaged[0]  # the newest: the one a resume would have used
    return (f"checkpoint file {first.path} is damaged ({first.reason}){more}; resuming from the newest intact "
            f"checkpoint, step {step} ({directory})")


def nothing_intact(damaged: list[DamagedFile], root: Path | str) -> CheckpointError:
    newest = damaged[0]
    return CheckpointError(f"checkpoint file {newest.path} is damaged ({newest.reason}) and no intact checkpoint is "
                           f"left under {root} ({len(damaged)} checked); delete {root} to train this run from scratch")
