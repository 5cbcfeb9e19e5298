"""The model registry: every export becomes a version aliased `challenger`; `champion` moves
only when the configured metric beats the current champion's."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config.schema import RegistryConfig
from pipeline.training.checkpoint import CheckpointError

CHALLENGER, CHAMPION = "challenger", "champion"


@dataclass
class Registration:
    name: str
    version: str
    metric: float
    promoted: bool
    previous_champion: str | None
    previous_metric: float | None
    reused: bool = False  # the model was registered already (a rerun): its version, no new one
    # how the champion was ranked, when not as this config ranks (another metric or direction):
    # the two values are not compared, and champion stays until `pipeline promote` moves it
    champion_ranked_by: str | None = None


class MissingArtifacts(CheckpointError):
    """A logged model whose files in the artifact store are not those the export wrote."""


SHIPPED = ("python_model.pkl", "code")  # what MLflow ships beside the model's files: the pickled class, its code


def shipped_files(model_uri: str) -> dict[str, dict[str, Any]]:
    """Size and sha256 of what a logged model ships beside its weights (`SHIPPED`: the pickled
    `PipelineModel` and the `pipeline` package it imports), as the artifact store holds them
    (read back once, at export: about 1 MB). The export records them; the register stage checks
    the store against the record, so a damaged or swapped pickle or module is named before a
    version points at it (a served model unpickles its class before any check of its own)."""
    import tempfile
    from pathlib import Path

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from pipeline.atomic import describe_file, describe_files

    repo = get_artifact_repository(model_uri)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="shipped-") as d, _no_progress_bar():
        for name in SHIPPED:
            local = Path(repo.download_artifacts(name, dst_path=d))
            if local.is_file():
                out[name] = describe_file(local)
            else:
                out.update({f"{name}/{rel}": e for rel, e in describe_files(local).items()})
    return out


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a bar per downloaded file set even into a log (a hundred lines for `code/`)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def check_logged_model(model_uri: str, files: dict[str, dict[str, Any]], task: str,
                       folder: str = "artifacts/model_dir", shipped: dict[str, dict[str, Any]] | None = None) -> None:
    """Before a version points at it: the logged model's files, as the artifact store lists them
    (nothing is downloaded), are all there, with the sizes the export recorded where the store
    reports sizes (`files`, relative to its `folder`), beside MLflow's own `MLmodel` and pickled
    model. A deleted or truncated artifact (a cleaned bucket, a partial copy) is one line naming it
    and nothing is registered, instead of a champion that fails when it is served. (Contents are
    checked when the model loads: its folder's `checksums.json`.) With `shipped` (what the export
    recorded of the pickled class and its code, `shipped_files`), those files too, by size as
    listed, and by content: they run before the model can check anything."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(model_uri)
    root = [a.path for a in repo.list_artifacts("")]
    if not root:
        raise MissingArtifacts(f"the logged model {model_uri} lists no files at all in its artifact store (deleted, "
                               "or a store this machine cannot see, e.g. a server's local folder): nothing registered")
    # (a `runs:/<run>/<path>` repository names what it lists `<path>/...`)
    nested = [p for p in root if p.endswith("/MLmodel")]
    prefix = nested[0].removesuffix("MLmodel") if "MLmodel" not in root and nested else ""
    listed: dict[str, int | None] = {}
    again = f"rerun the export stage (`dvc repro --force export@{task}`); nothing registered"

    def walk(path: str, deep: bool) -> None:
        for a in repo.list_artifacts(path):
            name = a.path.removeprefix(prefix)
            if not a.is_dir:
                listed[name] = a.file_size
            elif deep:
                walk(name, deep)

    walk("", deep=False)
    walk(folder, deep=True)
    if shipped:
        walk("code", deep=True)
    expected = {name: None for name in ("MLmodel", "python_model.pkl", f"{folder}/checksums.json")}
    expected.update({f"{folder}/{rel}": e["size"] for rel, e in files.items()})
    expected.update({rel: e["size"] for rel, e in (shipped or {}).items()})
    for path, size in sorted(expected.items()):
        if path not in listed:
            raise MissingArtifacts(f"the logged model {model_uri} has no {path} in its artifact store (deleted, or "
                                   f"never fully copied): {again}")
        if size is not None and listed[path] is not None and listed[path] != size:
            raise MissingArtifacts(f"the logged model {model_uri} has {path} of {listed[path]:,} bytes in its "
                                   f"artifact store, the export wrote {size:,}: {again}")
    if shipped:  # contents: read back (about 1 MB) and hashed
        now = shipped_files(model_uri)
        changed = sorted(p for p in shipped.keys() | now.keys() if shipped.get(p) != now.get(p))
        if changed:
            what = ", ".join(f"{p} ({'added' if p not in shipped else 'changed'})" for p in changed[:5])
            raise MissingArtifacts(f"the logged model {model_uri} ships other code than the export recorded: {what}"
                                   f"{' and more' if len(changed) > 5 else ''}: {again}")


# The eval config a version was scored with: the task's `eval` section as JSON, and its sha256.
EVAL_CONFIG, EVAL_CONFIG_DIGEST = "eval.config", "eval.config_digest"
SCORING_DIGEST = "eval.scoring_digest"  # of the eval settings the registry metric depends on
# the model settings that define what its loss measures (`Task.loss_settings`: a diffusion model's
# target and noise levels), as JSON: versions whose loss metrics come from other settings are not compared
LOSS_SETTINGS = "eval.loss_settings"
# which eval settings a registry metric depends on: the rows of a loss (its batch size no longer
# changes it); the samples, their sampler and the classifier for the sample scores. The device and
# the grid's size change no metric, so a version scored after changing them is still compared.
_LOSS_SETTINGS = ("max_batches", "batch_size")
_SAMPLE_SETTINGS = ("samples_per_class", "classifier_steps", "sample_steps", "sample_eta", "guidance_scale")


def scoring_settings(metric: str) -> tuple[str, ...]:
    """The eval settings `metric` depends on."""
    return _SAMPLE_SETTINGS if metric.startswith(("sample_", "classifier_")) else _LOSS_SETTINGS


def loss_settings_tag(settings: dict[str, Any]) -> dict[str, str]:
    """The version tag recording `Task.loss_settings` (none where the task has none)."""
    return {LOSS_SETTINGS: json.dumps(settings, sort_keys=True, separators=(",", ":"))} if settings else {}


def scoring_digest(block: dict[str, Any], metric: str) -> str:
    """The digest of the eval settings `metric` depends on (two versions compare only when equal)."""
    keys = scoring_settings(metric)
    return hashlib.sha256(json.dumps({k: block.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()


def eval_config_tags(block: dict[str, Any]) -> dict[str, str]:
    """The tags recording the eval config (`tasks.<task>.eval`) a version's eval/* scores come
    from. The same run scored anew under another eval config is another version of the same
    training commit: without them, `pipeline reproduce` evaluated with that commit's eval config
    and compared its scores with those of another."""
    text = json.dumps(block, sort_keys=True, separators=(",", ":"))
    return {EVAL_CONFIG: text, EVAL_CONFIG_DIGEST: hashlib.sha256(text.encode()).hexdigest()}


def recorded_eval_config(tags: dict[str, str]) -> dict[str, Any] | None:
    """The eval config a version records (`eval_config_tags`); None where it records none (versions
    registered before the tag) or one that does not match its digest (edited by hand)."""
    text = tags.get(EVAL_CONFIG)
    if text is None or hashlib.sha256(text.encode()).hexdigest() != tags.get(EVAL_CONFIG_DIGEST):
        return None
    try:
        block = json.loads(text)
    except ValueError:
        return None
    return block if isinstance(block, dict) else None


def registered_version(client: MlflowClient, name: str, model_uri: str, run_id: str, metric_value: float) -> str | None:
    """The newest version of `name` registered from `model_uri` with this metric value: a rerun of
    the register stage on the same export and evaluation (`dvc repro --force`, a retried job) finds
    it rather than adding a copy. The same model scored anew (another evaluation config, as a DVC
    experiment grid makes) is a new version that carries its own score."""
    versions = client.search_model_versions(f"run_id='{run_id}'")  # (hex: no quoting; the name is compared here)
    same = [int(v.version) for v in versions if v.name == name and model_uri in (v.tags.get("model_uri"), v.source)
            and v.tags.get("metric_value") == str(metric_value)]
    return str(max(same)) if same else None


def is_better(new: float, old: float | None, greater_is_better: bool) -> bool:
    """Whether `new` takes the champion alias from `old`. A non-finite value never wins, and a
    non-finite (or missing) champion value loses to any finite one: NaN compares false both ways,
    so a NaN champion would otherwise block every later promotion."""
    if not math.isfinite(new):
        return False
    if old is None or not math.isfinite(old):
        return True
    return new > old if greater_is_better else new < old


@dataclass
class Champion:
    version: str
    value: float | None  # None where the tag is missing or not a number: it gives way to any finite value
    metric: str | None  # the metric it was ranked by (None: not recorded)
    greater_is_better: bool | None  # and in which direction (None: not recorded, versions from before)
    eval_digest: str | None = None  # the eval settings that scored it (`scoring_digest`; None: not recorded)
    loss_settings: str | None = None  # what its loss measures (`LOSS_SETTINGS`; None: not recorded or none)

    def ranked_as(self, cfg: RegistryConfig, eval_digest: str | None = None,
                  loss_settings: str | None = None) -> bool:
        """Whether its value can be compared with one ranked as `cfg` ranks, scored under the eval
        config of `eval_digest` (a loss over 8 rows against one over 1,280 is no comparison) and,
        for a loss metric, by a model of `loss_settings` (an eps model's loss against a v model's)."""
        same_eval = None in (self.eval_digest, eval_digest) or self.eval_digest == eval_digest
        same_loss = scoring_settings(cfg.metric) != _LOSS_SETTINGS or None in (self.loss_settings, loss_settings) \
            or self.loss_settings == loss_settings
        return self.metric in (None, cfg.metric) and self.greater_is_better in (None, cfg.greater_is_better) \
            and same_eval and same_loss

    def ranking(self) -> str:
        way = {True: ", higher is better", False: ", lower is better", None: ""}[self.greater_is_better]
        return f"{self.metric}{way}"


def champion(client: MlflowClient, name: str) -> Champion | None:
    """The champion version and how it was ranked (its tags), or None when no version has the alias."""
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    try:
        value = float(mv.tags["metric_value"])
    except (KeyError, TypeError, ValueError):
        value = None
    direction = {"true": True, "false": False}.get(str(mv.tags.get("greater_is_better", "")).lower())
    return Champion(str(mv.version), value, mv.tags.get("metric_name"), direction, mv.tags.get(SCORING_DIGEST),
                    mv.tags.get(LOSS_SETTINGS))


def register(model_uri: str, run_id: str, cfg: RegistryConfig, metric_value: float,
             tags: dict[str, str], describe: Callable[[str], str] | None = None) -> Registration:
    """Register `model_uri` (with `describe(version)` as the version's description), alias it
    challenger, and promote it to champion if it is better. Idempotent: the same model with the
    same score registered already keeps its version (`registered_version`), and only the aliases
    are set again."""
    import mlflow

    if not math.isfinite(metric_value):  # before anything is registered: such a version could never be compared
        raise ValueError(f"registry metric {cfg.metric} is {metric_value}: not a finite number; nothing registered")
    client = MlflowClient()
    version = registered_version(client, cfg.name, model_uri, run_id, metric_value)
    reused = version is not None
    scored = scoring_digest(json.loads(tags[EVAL_CONFIG]), cfg.metric) if EVAL_CONFIG in tags else None
    if version is None:
        tags = {**tags, "metric_name": cfg.metric, "metric_value": str(metric_value),
                "greater_is_better": str(cfg.greater_is_better).lower(), "run_id": run_id, "model_uri": model_uri,
                **({SCORING_DIGEST: scored} if scored else {})}
        version = str(mlflow.register_model(model_uri, cfg.name, tags=tags).version)
    # (a rerun also mends a version whose first registration stopped before its description)
    if describe is not None and not (reused and client.get_model_version(cfg.name, version).description):
        client.update_model_version(cfg.name, version, description=describe(version))
    if client.get_registered_model(cfg.name).description != model_description(cfg):  # (the metric may change)
        client.update_registered_model(cfg.name, description=model_description(cfg))
    client.set_registered_model_alias(cfg.name, CHALLENGER, version)
    current = champion(client, cfg.name)
    prev_version, prev_value = (current.version, current.value) if current else (None, None)
    # a champion ranked by another metric or direction is not compared with this value (a perplexity
    # against a loss, or "lower is better" against an accuracy), nor one scored under other eval
    # settings of this metric (a loss over 8 rows against one over 1,280): it stays until promoted by hand
    other = None
    if current and current.version != version and not current.ranked_as(cfg, scored, tags.get(LOSS_SETTINGS)):
        if not current.ranked_as(cfg):
            other = current.ranking()
        elif not current.ranked_as(cfg, scored):
            other = f"{current.ranking()} under other eval settings ({', '.join(scoring_settings(cfg.metric))})"
        else:
            other = f"{current.ranking()} of a model with other loss settings ({current.loss_settings})"
    promoted = other is None and prev_version != version and is_better(metric_value, prev_value,
                                                                        cfg.greater_is_better)
    if promoted:
        client.set_registered_model_alias(cfg.name, CHAMPION, version)
    return Registration(cfg.name, version, metric_value, promoted, prev_version, prev_value, reused, other)


# --- what a person reads in the registry: a version's own lineage (tags) and a description ---

# The data stages behind a model and the out of each, as dvc.lock names them (`data/<task>/<out>`).
DATA_STAGES = (("prepare", "prepared"), ("shard", "shards"))
_KIND = {"lm": "language model (GPT)", "diffusion": "class-conditional diffusion model"}


def version_tags(run: Run) -> dict[str, str]:
    """A registered version's own lineage, under a few names: its task; the commit it was trained
    at (and whether the tree had uncommitted changes); the digest of its config; its data: the
    sha256 of the raw examples as read, DVC's md5 of its task's prepared data and shards (keys
    as `dvc.lock` names them, `dvc.<stage>:<task>.<path>`) and the shard manifest's md5; and the
    weights it started from, if any. Everything else the run records (every hash in dvc.lock,
    package versions, Ray and kernel details) stays on the run: `python -m pipeline lineage`."""
    tags = run.data.tags
    task = tags.get("task", "")
    out = {"task": task}
    for key in ("git.commit", "git.dirty", "config.digest", "data.manifest_md5",
                "init_from.path", "init_from.fingerprint"):
        if key in tags:
            out[key] = tags[key]
    for stage, name in DATA_STAGES:
        key = f"dvc.{stage}:{task}.data/{task}/{name}"
        if key in tags:
            out[key] = tags[key]
    for i in run.inputs.dataset_inputs if run.inputs else []:
        if i.dataset.name == f"{task}-raw":
            out["data.raw_sha256"] = {t.key: t.value for t in i.tags}.get("digest_full", i.dataset.digest)
    return out


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _parameters(n: str | None) -> str:
    if not (n and n.isdigit()):
        return "parameters not recorded"
    count = int(n)
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.3g}{unit} parameters"
    return f"{count} parameters"


def describe_version(name: str, version: str, run: Run, metrics: dict[str, float], cfg: RegistryConfig,
                     tracking_uri: str, example: str | None = None, hf_architecture: str | None = None) -> str:
    """The version's description (Markdown, as the MLflow UI shows it): a summary line (the
    versions table shows the start), what was trained on what, the headline metrics, the run it
    came from, and how to load it."""
    tags, params = run.data.tags, run.data.params
    task = tags.get("task", "?")
    preset = tags.get("model.preset") or params.get("model.preset", "?")
    strategy, precision = tags.get("strategy", "?"), tags.get("precision", "?")
    workers = tags.get("cluster.workers") or params.get("cluster.num_workers", "?")
    steps = run.data.metrics.get("train/steps", params.get("trainer.max_steps", "?"))
    started = (datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
               if run.info.start_time else "?")
    better = "higher" if cfg.greater_is_better else "lower"
    commit = tags.get("git.commit", "unknown")
    dirty = {"false": "clean", "true": "with uncommitted changes"}.get(tags.get("git.dirty", ""), "state unknown")
    lineage = version_tags(run)
    data = [f"raw examples sha256 `{lineage['data.raw_sha256']}`"] if "data.raw_sha256" in lineage else []
    data += [f"`{k.split('.', 2)[2]}` (`{k.split('.')[1]}`) `{v}`" for k, v in lineage.items() if k.startswith("dvc.")]
    if "data.manifest_md5" in lineage:
        data.append(f"shard manifest md5 `{lineage['data.manifest_md5']}`")
    lines = [
        f"{task} · {preset} ({_parameters(tags.get('model.parameters'))}) · {strategy} on {workers} workers, "
        f"{precision} · {cfg.metric} {_fmt(metrics.get(cfg.metric))} · trained {started}",
        "",
        f"A {_KIND.get(task, 'model')}, `{preset}`, trained {_fmt(steps)} steps with `{strategy}` on "
        f"{workers} workers ({precision}) on `{params.get('data.source', '?')}`.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| **{cfg.metric}** (registry metric, {better} is better) | **{_fmt(metrics.get(cfg.metric))}** |",
        *(f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()) if k != cfg.metric),
        "",
        "**Where it came from**",
        "",
        f"- MLflow run `{run.info.run_name}` ({run.info.run_id})",
        f"- git commit `{commit}` ({dirty}); config digest `{tags.get('config.digest', '?')}`",
        "- data: " + ("; ".join(data) or "hashes not recorded"),
        f"- the whole chain (every stage's DVC hashes, datasets, config, and whether this workspace still "
        f"matches): `python -m pipeline lineage {name}/{version}`",
        "",
        "**Load it**",
        "",
        "```python",
        "import mlflow, pandas",
        f'mlflow.set_tracking_uri("{tracking_uri}")',
        f'model = mlflow.pyfunc.load_model("models:/{name}@champion")  # whichever version is champion',
        f'model = mlflow.pyfunc.load_model("models:/{name}/{version}")  # this version',
        *([f"model.predict(pandas.DataFrame({example}))"] if example else []),
        "```",
    ]
    if hf_architecture:
        lines += [
            "",
            f"**As a Hugging Face model** ({hf_architecture}): the version's files hold a `transformers` folder, "
            f"`hf/` (in the workspace that trained it: `export/{task}/hf/`).",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'folder = mlflow.pyfunc.load_model("models:/{name}/{version}").unwrap_python_model().dir / "hf"',
            "model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)",
            "```",
        ]
    return "\n".join(lines)


def model_description(cfg: RegistryConfig) -> str:
    """The registered model's own description, kept to the metric this config ranks by."""
    better = "highest" if cfg.greater_is_better else "lowest"
    return (f"Versions registered by this project's `register` stage (`dvc repro`). `@challenger` is the one "
            f"registered last; `@champion` the one with the {better} `{cfg.metric}` so far (`python -m pipeline "
            "promote` moves it by hand). Each version's description says what it was trained on, its metrics, "
            "and how to load it.")
