"""Load the logged MLflow model the way a serving machine would: with only what it ships.

A model that "loads" in the exporting process proves little: there every package the project uses is
importable and `pipeline` is already imported from the source tree, so a served model that imports Ray
or ONNX, or whose `code/` lacks a module, would pass and then fail in `mlflow models serve`, a Docker
image from `mlflow models build-docker`, or any environment built from its `requirements.txt`.

So the export's round trip runs in a fresh interpreter whose import path holds nothing but the
distributions the model's own `requirements.txt` needs (its pins and their dependencies, resolved from
what is installed here, linked into a private folder: no download, no virtualenv), and `pipeline`
from the model's `code/` (MLflow puts it on the path when it loads the model). Its predictions must be
those the exporting process gets from the same input.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

# The interpreter's first statement: the private site folder is its only import path beyond the
# standard library (`-S` skips site-packages, `.pth` files and so the project's editable install;
# the script folder entry `-c` adds, the working directory, goes too).
_BOOT = "import sys; sys.path[:] = [p for p in sys.path if p] + [sys.argv.pop(1)]; exec(sys.argv.pop(1))"

# What the fresh interpreter runs: load the model folder, predict the example, print the table.
_LOAD = r"""
import json, sys
import torch
torch.set_num_threads(int(sys.argv[3]))
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
with open(sys.argv[2]) as f:
    example = pd.DataFrame(json.load(f))
out = model.predict(example)
table = out.to_dict(orient="list") if isinstance(out, pd.DataFrame) else {"": out.tolist()}
sys.stdout.write("\n@@prediction@@" + json.dumps(table))
"""

TIMEOUT_S = 600  # a model that cannot load and predict two examples in ten minutes will not serve either


class LoadAloneError(ValueError):
    """The logged model does not load, or predicts otherwise, with only what it ships."""


def requirements(model_dir: Path) -> list[str]:
    """The model's `requirements.txt`, one requirement a line (comments and pip options skipped)."""
    lines = (model_dir / "requirements.txt").read_text().splitlines()
    return [s for line in lines if (s := line.split("#", 1)[0].strip()) and not s.startswith("-")]


def closure(reqs: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions `reqs` need, transitively (markers evaluated here, extras followed).
    A requirement not installed here is left out: the load then fails on its import, naming it."""
    found: dict[str, md.Distribution] = {}
    todo: list[Requirement] = []
    for r in reqs:
        try:
            todo.append(Requirement(r))
        except InvalidRequirement as e:
            raise LoadAloneError(f"requirements.txt: {r!r} is not a requirement ({e})") from None
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[name] = dist
        for line in dist.requires or []:
            dep = Requirement(line)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return found


def private_site(dists: dict[str, md.Distribution], into: Path) -> Path:
    """A folder of links to each distribution's top-level files (packages, modules, bundled `.libs`,
    its `.dist-info`, for `importlib.metadata`): the import path of an environment holding only them."""
    into.mkdir(parents=True, exist_ok=True)
    for name, dist in sorted(dists.items()):
        files = [Path(str(f)).parts for f in dist.files or []]
        tops = {parts[0] for parts in files}
        if not tops:  # installed without a file record (some conda packages): its import names then
            tops = {top for top, owners in md.packages_distributions().items()
                    if name in {canonicalize_name(o) for o in owners}}
        base = Path(dist.locate_file(""))
        for top in sorted(tops):
            if top in ("..", "bin", "__pycache__") or top.endswith(".pth"):
                continue  # outside site-packages (scripts), or start-up hooks the check must not run
            src = base / top
            if src.is_dir() and not (src / "__init__.py").exists() and not top.endswith((".dist-info", ".libs")):
                # a namespace package several distributions share (nvidia/ of the CUDA wheels): a folder
                # of its own holding only this distribution's entries, not the others' too
                for second in sorted({parts[1] for parts in files if len(parts) >= 2 and parts[0] == top} -
                                     {"__pycache__"}):
                    _link(src / second, into / top / second)
            else:
                _link(src, into / top)
    return into


def _link(src: Path, link: Path) -> None:
    if src.exists() and not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(src.resolve())


def _undeclared(module: str, have: dict[str, md.Distribution]) -> str:
    """Why `module` was missing: the distribution that provides it here, when that is one the
    requirements do not reach; otherwise nothing to add."""
    top = module.partition(".")[0]
    if top == "pipeline":
        return f" (the model's code/ lacks {module})"
    owners = md.packages_distributions().get(top, [])
    if owners and not any(canonicalize_name(o) in have for o in owners):
        return (f" ({top} is installed here, from {', '.join(sorted(owners))}, but the model's requirements "
                "do not need it: import it only where training needs it, or add it to the pyfunc's pip_requirements)")
    return ""


def check_loads_alone(model: str | Path, example: pd.DataFrame, expected: Any) -> dict[str, list]:
    """Load the MLflow model `model` (a folder, or a URI to download it from) in a fresh interpreter
    that sees only its requirements and its code, predict `example` there, and check the prediction
    equals `expected` (what the exporting process predicted: equal text, and numbers within 1e-5).
    Returns the fresh process's prediction as `as_table` gives it."""
    import torch

    with tempfile.TemporaryDirectory(prefix="load-alone-") as scratch:
        if isinstance(model, Path):
            folder = model.resolve()
        else:  # what a serving machine gets: the artifact store's copy
            import mlflow

            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=f"{scratch}/model"))
        reqs = requirements(folder)
        have = closure(reqs)
        site = private_site(have, Path(scratch) / "site")
        frame = Path(scratch) / "example.json"
        frame.write_text(json.dumps(example.to_dict(orient="list")))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        try:
            done = subprocess.run(
                [sys.executable, "-S", "-c", _BOOT, str(site), _LOAD, str(folder), str(frame),
                 str(torch.get_num_threads())],
                cwd=scratch, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise LoadAloneError(f"the logged model did not load and predict within {TIMEOUT_S} s in a fresh "
                                 "process holding only its requirements") from None
    if done.returncode != 0 or "@@prediction@@" not in done.stdout:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        missing = ""
        if found := re.match(r"ModuleNotFoundError: No module named '([\w.]+)'", last):
            missing = _undeclared(found[1], have)
        elif found := re.match(r"ImportError: cannot import name '(\w+)' from '([\w.]+)'", last):
            missing = _undeclared(f"{found[2]}.{found[1]}", have)
        raise LoadAloneError(f"the logged model does not load with only what it ships (its code/ and "
                             f"requirements.txt: {', '.join(reqs)}): {last}{missing}")
    return _agreeing(json.loads(done.stdout.rsplit("@@prediction@@", 1)[1]), expected, "when loaded alone")


def check_loads_here(model: str | Path, example: pd.DataFrame, expected: Any) -> dict[str, list]:
    """`check_loads_alone` in this process (`export.load_alone: false`): the logged model, loaded
    back from the artifact store, must still predict what the exporting process predicted."""
    import mlflow

    got = as_table(mlflow.pyfunc.load_model(str(model)).predict(example))
    return _agreeing(got, expected, "when loaded back in this process")


def _agreeing(got: dict[str, list], expected: Any, where: str) -> dict[str, list]:
    if not _predictions_agree(got, want := as_table(expected)):
        raise LoadAloneError(f"the logged model predicts otherwise {where}: {_head(got)} against "
                             f"{_head(want)} in the exporting process")
    return got


def as_table(prediction: Any) -> dict[str, list]:
    """A pyfunc's prediction as JSON holds it: a table's columns by name; an array (the diffusion
    model's images) as the one column ""."""
    import numpy as np

    if isinstance(prediction, pd.DataFrame):
        return json.loads(json.dumps(prediction.to_dict(orient="list")))
    return {"": np.asarray(prediction).tolist()}


def _predictions_agree(a: dict[str, list], b: dict[str, list]) -> bool:
    """Two predictions as tables: the same columns, text equal, numbers within 1e-5."""
    import numpy as np

    if a.keys() != b.keys():
        return False
    for col, xs in a.items():
        ys = b[col]
        if len(xs) != len(ys):
            return False
        if any(isinstance(v, str) for v in xs + ys):
            if xs != ys:
                return False
        elif not np.allclose(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), atol=1e-5, rtol=0):
            return False
    return True


def _head(table: dict[str, list]) -> str:
    return json.dumps({k: v[:2] for k, v in table.items()})[:200]
