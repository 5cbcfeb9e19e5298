"""A safetensors file written one tensor at a time.

`safetensors.torch.save_file` takes the whole state dict at once: the process writing a
model's weights must hold every tensor (and, while it serialises, their bytes) together. For a
model sharded over many ranks that is the one moment a whole model lands in one process, and
at 7B in fp32 it is 28 GB. The format does not need it: its header (names, dtypes, shapes,
byte offsets) is known from the shapes alone, so it is written first, and then each tensor's
bytes go to their offset as the tensor arrives and are dropped. The result is an ordinary
safetensors file that `safe_open` and `load_file` read.

The file appears whole or not at all (a temporary sibling renamed into place), and a tensor
that does not match the header it was announced with is a clear error naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from pipeline.atomic import as_open_creates

# safetensors' dtype names (the format's spec, safetensors/src/tensor.rs)
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}

Spec = tuple[torch.dtype, tuple[int, ...]]


def header(specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The file's first bytes (8-byte little-endian length, then the JSON header padded with
    spaces to a multiple of 8, as safetensors pads it) and each tensor's byte offset in the
    data that follows, in the order of `specs`."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, at = {}, 0
    for name, (dtype, shape) in specs.items():
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        entries[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        offsets[name], at = at, at + size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


def write_streamed(path: Path | str, specs: Mapping[str, Spec], tensors: Iterable[tuple[str, torch.Tensor | None]],
                   metadata: Mapping[str, str] | None = None) -> int:
    """Write `tensors` (name, tensor pairs, in any order, each announced in `specs` as (dtype,
    shape)) to `path` as one safetensors file; returns its size in bytes. Only one tensor is
    held at a time: the caller's iterator may gather each from its shards and drop it once
    written. Pairs whose tensor is None are consumed and skipped (a rank that takes part in a
    collective gather without writing drains the same iterator with `path=None`, see
    `drain_or_write`). Every announced tensor must arrive exactly once."""
    path = Path(path)
    head, offsets = header(specs, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    as_open_creates(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(head)
            written: set[str] = set()
            for name, tensor in tensors:
                if tensor is None:
                    continue
                if name not in specs:
                    raise ValueError(f"tensor {name!r} was not announced in the file's header")
                if name in written:
                    raise ValueError(f"tensor {name!r} arrived twice")
                dtype, shape = specs[name]
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; the header "
                                     f"announced {dtype} {tuple(shape)}")
                fh.seek(len(head) + offsets[name])
                fh.write(_bytes(tensor))
                written.add(name)
                del tensor  # dropped before the iterator gathers the next one
            if missing := [n for n in specs if n not in written]:
                raise ValueError(f"{len(missing)} announced tensor(s) never arrived: {', '.join(missing[:5])}")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return len(head) + sum(_nbytes(s) for s in specs.values())
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def drain_or_write(path: Path | str | None, specs: Mapping[str, Spec],
                   tensors: Iterable[tuple[str, torch.Tensor | None]]) -> int:
    """`write_streamed` on the rank that writes (`path` given); elsewhere just run the iterator,
    whose steps may be collectives every rank has to join. Returns the bytes written (0 when
    only drained). If the write fails (a full disk, a tensor that does not match), the writer
    still runs the iterator to its end before raising, so the other ranks' gathers complete
    instead of waiting on it."""
    it = iter(tensors)
    if path is not None:
        try:
            return write_streamed(path, specs, it)
        except Exception:
            with contextlib.suppress(Exception):  # the write's error is the one to report
                for _ in it:
                    pass
            raise
    for _ in it:  # (the loop variable is rebound at once: nothing is kept)
        pass
    return 0


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy where it is already contiguous on the CPU (as a uint8
    view, which also covers dtypes numpy lacks, such as bfloat16). safetensors is little-endian,
    as every platform torch supports."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _nbytes(spec: Spec) -> int:
    dtype, shape = spec
    return _numel(shape) * torch.empty((), dtype=dtype).element_size()
