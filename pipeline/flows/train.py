"""The train stage on the driver: check inputs before taking resources, open (or
resume) the MLflow run, fit on Ray, then write the final model and metrics atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from pipeline.atomic import atomic_write_text
from pipeline.config import config_digest, flatten
from pipeline.config.elastic import check_task_elastic, strategy_reshards, worker_counts
from pipeline.config.parallel import check_task_parallel, data_parallel_size
from pipeline.config.presets import preset_warning
from pipeline.config.schema import PipelineConfig
from pipeline.data.build import file_md5
from pipeline.data.shard_format import MANIFEST, filesystem, load_manifest
from pipeline.data.shard_store import publish
from pipeline.data.shard_tokenizer import checked_tokenizer
from pipeline.data.shard_verify import check_split
from pipeline.distributed import check_gpu_host, gpu_cluster_warning, preflight
from pipeline.distributed.planner import check_fits
from pipeline.distributed.precision import check_fp8_config, fp8_layers_warning
from pipeline.runtime import connect
from pipeline.runtime.connect import check_reachable, cluster_address, embedded
from pipeline.runtime.recovery import Recovery, recover, run_dir_of, storage_root
from pipeline.runtime.trainer import absolute_init_paths, fit
from pipeline.tasks import task_for_data
from pipeline.tracking import lineage, mlflow_runs, plots
from pipeline.tracking.live import fill_missing, outage_cause, reachable_from_anywhere
from pipeline.training.checkpoint import (
    WEIGHTS,
    CheckpointError,
    read_meta,
    safetensors_shapes,
    write_model,
)
from pipeline.training.init_weights import check_task_init_weights
from pipeline.training.loop import micro_batch_size
from pipeline.training.optim import check_kernels


@dataclass
class TrainOutcome:
    run_id: str
    run_name: str
    final_loss: float
    steps: int
    seconds: float


RUN_ID_FILE = "mlflow_run_id"  # beside a Ray run's checkpoints: the MLflow run it logs to


class TrainingFailed(RuntimeError):
    """Training stopped with an error after its retries; its checkpoints are kept and a rerun
    resumes from the last one. The CLI reports it in one line (`pipeline.cli._known_errors`), not
    a launcher's traceback of 85 lines."""


def _innermost(error: BaseException, task_name: str) -> str:
    """The exception a worker raised, behind the launcher's wrappers (Ray's task errors keep it as
    `cause`, Ray Train as `_base_exc`), as `Type: first line` without the task's own prefix; for
    Ray Train's group of failed workers, the one that died first, else the first rank's error."""
    if getattr(error, "worker_failures", None):
        from pipeline.runtime.failures import _summary

        return _summary(error).removeprefix(f"[{task_name}] ")
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = next((x for x in (getattr(error, "cause", None), getattr(error, "_base_exc", None), error.__cause__)
                      if isinstance(x, BaseException)), None)
        if inner is None:
            break
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {(lines[0] if lines else '').removeprefix(f'[{task_name}] ')}"


def _history_csv(history: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for h in history for k in h))  # validation rows add val_loss
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def _run_to_continue(run_id: str, task_name: str, experiment_id: str) -> Any:
    """The MLflow run an interrupted Ray run logged to, if it is there to continue: None when the
    store no longer has it (reset, or another store; or the marker's id is damaged), it was
    deleted in the UI (logging to it failed at every rerun), or it belongs to another experiment
    than `tracking.experiment` names now (a rerun with `-S tracking.experiment=...` would
    otherwise log on in the old one and leave the new one empty), so a new run starts (the
    driver copies the checkpoint's history into it). Any other error (a server that answered
    503, a timeout) is not a missing run: it stops the stage, rather than split the training
    over two runs."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # (gone, or a damaged id)
            raise mlflow_runs.TrackingUnavailable(
                f"cannot read MLflow run {run_id}, which this training logs to ({outage_cause(e)}); "
                "nothing was trained: rerun when the tracking store answers") from None
        return None
    if run.info.lifecycle_stage == "deleted":
        print(f"[{task_name}] MLflow run {run_id}, which this training logged to, was deleted: starting a new run "
              f"(restore it with `mlflow runs restore --run-id {run_id}` before rerunning to keep one)", flush=True)
        return None
    if run.info.experiment_id != experiment_id:
        before = mlflow.MlflowClient().get_experiment(run.info.experiment_id)
        print(f"[{task_name}] MLflow run {run_id}, which this training logged to, is in experiment "
              f"'{before.name if before else run.info.experiment_id}', not in tracking.experiment's: starting a new "
              "run there (the history so far is copied from the checkpoint)", flush=True)
        return None
    return run


def _retag_resumed(run: Any, tags: dict[str, str]) -> None:
    """A run resumed by another attempt is tagged with that attempt's code and environment (its
    `git.commit` stayed the first attempt's, and `pipeline reproduce` checked out the first); the
    earlier commits stay listed in `git.resumed_from`."""
    now = {k: v for k, v in tags.items() if k.startswith(("git.", "env."))}
    before = run.data.tags.get("git.commit")
    if before and before != now.get("git.commit"):
        earlier = [c for c in run.data.tags.get("git.resumed_from", "").split(",") if c]
        now["git.resumed_from"] = ",".join(dict.fromkeys([*earlier, before]))
    if any(run.data.tags.get(k) != v for k, v in now.items()):
        client = mlflow.MlflowClient()
        for key, value in now.items():
            client.set_tag(run.info.run_id, key, value)


def _mlflow_run(cfg: PipelineConfig, task_name: str, run_dir: str, tags: dict[str, str]) -> str:
    """Continue the MLflow run of an interrupted Ray run, or start a new one. The run's id is
    kept beside its checkpoints (`<run_dir>/mlflow_run_id`, a local folder or an s3:// prefix),
    so a rerun from any machine that sees the storage continues the same MLflow run."""
    experiment_id = mlflow_runs.setup(cfg.tracking)
    fs, marker = filesystem(f"{run_dir.rstrip('/')}/{RUN_ID_FILE}")
    if fs.exists(marker):
        run_id = fs.cat_file(marker).decode().strip()
        if (found := _run_to_continue(run_id, task_name, experiment_id)) is not None:
            _retag_resumed(found, tags)
            return run_id
    params = flatten({"task": task_name, **cfg.task(task_name).model_dump(mode="json"),
                      "strategy": cfg.strategy.model_dump(), "parallel": cfg.parallel.model_dump(),
                      "precision": cfg.precision.model_dump(), "cluster": cfg.cluster.model_dump(), "seed": cfg.seed})
    # a name a person can read: lm-tiny-ddp-2026-12-02T2031 (task, model preset, strategy, start time)
    name = mlflow_runs.run_name(task_name, cfg.task(task_name).model, cfg.strategy.name)
    with mlflow.start_run(run_name=name, tags={**tags, "config.digest": config_digest(params)}) as run:
        mlflow.log_params(mlflow_runs.safe_params(params))
    fs.makedirs(marker.rsplit("/", 1)[0], exist_ok=True)  # (object stores have no folders: a no-op)
    fs.pipe_file(marker, run.info.run_id.encode())
    return run.info.run_id


def _parameter_count(spec: dict[str, Any], weights: Path | None) -> int | None:
    """Trainable parameters of the model (tied weights once), counted on a copy built on the meta
    device (no memory); the stored tensors' sizes (from the safetensors header) if that cannot
    be built (None without weights to read)."""
    import torch

    from pipeline.tasks import task_for_spec

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in task_for_spec(spec).build(spec).parameters())
    except Exception:  # a count for a description is never worth failing the stage
        return sum(math.prod(shape) for shape in safetensors_shapes(weights).values()) if weights else None


def _known_before_fit(cfg: PipelineConfig, run_name: str, recovered: Recovery | None,
                      spec: dict[str, Any]) -> dict[str, str]:
    """Tags the driver knows before training: the model's parameter count (from its spec), and
    where a run resumes from a local checkpoint, what ran before (`impl.*`: backend, kernels, as
    the workers decided them). Set at the start, so a run that fails still carries them."""
    tags = {}
    if (parameters := _parameter_count(spec, None)) is not None:
        tags["model.parameters"] = str(parameters)
    run_dir = run_dir_of(cfg, run_name)
    if recovered and recovered.verified and run_dir is not None:
        try:
            implementation = read_meta(run_dir / recovered.verified).get("implementation", {})
        except (CheckpointError, OSError, ValueError):  # (`recover` checked it; a description only)
            implementation = {}
        tags.update({f"impl.{k}": str(v) for k, v in implementation.items()})
    return tags


# The sampler's defaults when it was part of model.diffusion (and so of every diffusion run's name).
NAMED_WITH_SAMPLER = {"sample_steps": 100, "sample_eta": 1.0, "guidance_scale": 1.0}

# Settings that never change the trained weights: a rerun with other values resumes the same run.
HARMLESS_TRAINER_KEYS = ("log_every", "ckpt_every", "keep_last_k", "prefetch_batches", "max_nonfinite_in_a_row",
                         "peak_tflops")


def run_identity(cfg: PipelineConfig, task_name: str, manifest_md5: str) -> dict[str, Any]:
    """What keys a training run (its name, hence the Ray run it resumes): everything that
    changes the trained weights, nothing else. Evaluation, export and registry settings, how
    often to log and checkpoint, how many checkpoints to keep and how far to prefetch may
    change between a crash and its rerun (lowering `keep_last_k` after a full disk must not
    throw the progress away). Validation keys only count when the loop acts on the validation
    loss (a plateau schedule, early stopping, handing on the best validation's weights)."""
    tcfg = cfg.task(task_name)
    task = tcfg.model_dump(mode="json", exclude={"eval", "export", "registry"})
    if "diffusion" in task["model"]:
        # the sampler moved from model.diffusion to eval (it keys nothing); runs named while it was
        # there, at its defaults, keep their names, so they resume after the upgrade
        task["model"]["diffusion"] = {**task["model"]["diffusion"], **NAMED_WITH_SAMPLER}
    # the split seed keys the data, which the manifest's md5 keys already (runs named before it existed resume)
    task["data"]["split"].pop("seed", None)
    trainer = task["trainer"]
    for key in HARMLESS_TRAINER_KEYS:
        trainer.pop(key)
    if trainer["export_weights"] == "last":  # (runs named before the key existed keep their names)
        trainer.pop("export_weights")
    if tcfg.optim.schedule != "plateau" and not tcfg.trainer.early_stop_patience and "export_weights" not in trainer:
        trainer.pop("eval_every")
        trainer.pop("eval_batches")
    precision = cfg.precision.model_dump()
    if cfg.precision.dtype != "fp8":  # fp8's own settings change nothing else (and runs named before they
        precision = {"dtype": cfg.precision.dtype}  # existed keep their names, so they still resume)
    identity: dict[str, Any] = {"task": task, "seed": cfg.seed, "data": manifest_md5,
                                "strategy": cfg.strategy.model_dump(), "precision": precision}
    if not strategy_reshards(cfg.strategy.name):
        # the other layouts resume at any worker count (same samples, same global batch): one run
        identity["workers"] = cfg.cluster.num_workers
    if cfg.parallel.tp * cfg.parallel.pp > 1:  # (absent otherwise)
        identity["parallel"] = cfg.parallel.model_dump()
    pretrained = getattr(tcfg.model, "init_from", None) or tcfg.trainer.init_from
    if pretrained:  # other weights at the same path are another run
        identity["init_from"] = lineage.weights_fingerprint(Path(pretrained))
    return identity


def check_task_config(cfg: PipelineConfig, task_name: str) -> None:
    """What the config alone decides about training one task, beyond each key's own validation:
    checked per task (a config may hold a chain that cannot use the layout while another trains
    with it), by the train stage before any resource and by `pipeline validate` before a run."""
    tcfg = cfg.task(task_name)
    check_fp8_config(cfg, cfg.cluster.use_gpu)  # fp8: a strategy it is wired into, GPUs (unless emulated)
    check_task_parallel(cfg, task_name)  # heads, layers and batch against parallel.tp / parallel.pp
    # fp8 on a model with no layer float8 converts; settings a run of this config never reaches; a
    # model labelled with a preset it is not (configs/ of the working directory, where there is one)
    warnings = [fp8_layers_warning(cfg, task_name), *schedule_warnings(cfg, task_name),
                preset_warning(tcfg.model, f"tasks.{task_name}.model")]
    for warning in filter(None, warnings):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    check_task_elastic(cfg, task_name)  # the batch at every worker count of an elastic range
    micro_batch_size(tcfg.trainer.global_batch_size,
                     data_parallel_size(cfg.cluster.num_workers, cfg.parallel.tp, cfg.parallel.pp),
                     tcfg.trainer.grad_accum_steps)


def schedule_warnings(cfg: PipelineConfig, task_name: str) -> list[str]:
    """Settings that do nothing in a run of this config, each said in one line by the train
    stage (warnings, not validation errors: every stage validates the whole config, and a config
    that trained before must still evaluate and export): a warmup as long as the run (the learning
    rate never gets to optim.lr, the decay never starts), the plateau schedule or early stopping
    with a validation interval no step reaches, label smoothing on the diffusion loss."""
    tcfg = cfg.task(task_name)
    tr, optim, key = tcfg.trainer, tcfg.optim, f"tasks.{task_name}"
    out = []
    if optim.warmup_steps >= tr.max_steps:
        after = "" if optim.schedule in ("constant", "plateau") else f", and the {optim.schedule} schedule never starts"
        out.append(f"{key}.optim.warmup_steps ({optim.warmup_steps}) >= trainer.max_steps ({tr.max_steps}): the "
                   f"learning rate reaches {tr.max_steps / optim.warmup_steps:.0%} of optim.lr at the last step{after}")
    users = [what for what, on in (("optim.schedule 'plateau'", optim.schedule == "plateau"),
                                    ("trainer.early_stop_patience", tr.early_stop_patience > 0)) if on]
    if users and tr.eval_every > tr.max_steps:
        out.append(f"{key}: {' and '.join(users)} act{'s' if len(users) == 1 else ''} on the validation loss, which "
                   f"trainer.eval_every ({tr.eval_every}) never computes within trainer.max_steps ({tr.max_steps}): "
                   "lower eval_every")
    if tcfg.data.kind == "images" and tr.label_smoothing > 0:
        out.append(f"{key}.trainer.label_smoothing smooths the language model's cross-entropy; the diffusion loss "
                   "(noise regression) has nothing to smooth: it does nothing here")
    return out


def train_task(cfg: PipelineConfig, task_name: str, shards_dir: Path, model_dir: Path,
               metrics_dir: Path, reports_dir: Path | None = None) -> TrainOutcome:
    # The run is named by the config as written (a relative init_from keys the same run from any
    # checkout); everything after, the workers included, sees the weights' absolute paths.
    given, cfg = cfg, absolute_init_paths(cfg)
    tcfg = cfg.task(task_name)
    # Fail before any Ray resource is taken: bad shards, or a batch that cannot be split.
    batch = (tcfg.trainer.global_batch_size, f"tasks.{task_name}.trainer.global_batch_size")
    check_split(shards_dir, "train", batch=batch)  # manifest, sizes, a batch; each node's workers hash the shards
    checked_tokenizer(shards_dir)  # evaluate and export need the shards' own tokenizer: found now, not after training
    spec = task_for_data(tcfg.data.kind).model_spec(tcfg, load_manifest(shards_dir))  # vocabulary, context, tokenizer
    # checksums, safetensors headers, and each tensor's shape against the model the spec builds: a
    # damaged or misfitting file is named here, not in each worker
    check_task_init_weights(tcfg, task_name, spec)
    check_gpu_host(cfg)  # use_gpu on the local Ray of a machine without CUDA would wait for a GPU for ever
    preflight(cfg, cfg.cluster.use_gpu)
    check_kernels(cfg)  # Apex kernels asked for where Apex is not installed
    check_task_config(cfg, task_name)
    check_fits(cfg, task_name, load_manifest(shards_dir))  # with cluster.device_memory: does a rank's peak fit?
    manifest_md5 = file_md5(shards_dir / MANIFEST)
    uri = mlflow_runs.tracking_uri(cfg.tracking)
    identity = run_identity(given, task_name, manifest_md5)
    pretrained = getattr(tcfg.model, "init_from", None) or tcfg.trainer.init_from
    run_name = f"{task_name}-{config_digest(identity)}"
    tags = lineage.run_tags({"task": task_name, "data.manifest_md5": manifest_md5, "ray.run_name": run_name,
                             "strategy": cfg.strategy.name, "precision": cfg.precision.dtype,
                             "cluster.workers": cfg.cluster.num_workers,
                             "model.preset": mlflow_runs.model_label(tcfg.model),
                             "parallel": f"tp={cfg.parallel.tp},pp={cfg.parallel.pp}",
                             **({"init_from.path": str(Path(pretrained).resolve()),
                                 "init_from.fingerprint": identity["init_from"]} if pretrained else {})})
    tags.update(lineage.dvc_lock_hashes())

    # The cluster and the tracking server answer, or the stage stops in one line (in seconds,
    # not after minutes of retries) before an MLflow run is opened.
    if address := cluster_address(cfg.cluster):
        check_reachable(address, cfg.cluster.connect_timeout_s)
    mlflow_runs.check_reachable(cfg.tracking, lambda *a, **k: print(f"[{task_name}]", *a, **k))
    # Ray next: a cluster that refuses us (an address of the wrong form, no `auto` cluster, a
    # local Ray that cannot write its files) stops the stage before a run or its marker exists.
    where = connect(cfg.cluster)
    if warning := gpu_cluster_warning(cfg):  # (an autoscaler may still add GPU nodes: a warning, not a refusal)
        print(f"[{task_name}] warning: {warning}", flush=True)
    run_dir = f"{storage_root(cfg).rstrip('/')}/{run_name}"  # a local folder or an s3:// prefix
    manifest = load_manifest(shards_dir)
    try:
        with mlflow_runs.bounded_requests():  # a hung server: one line in seconds, not minutes of retries
            run_id = _mlflow_run(cfg, task_name, run_dir, tags)
            mlflow_runs.log_datasets(run_id, task_name, manifest.get("source", tcfg.data.source),
                                     manifest.get("raw_sha256"), shards_dir, manifest_md5, tags)
            # what prepare read, repaired, re-decoded, refused and dropped (params: a rerun logs the same values)
            mlflow.log_params({f"prepared.{k}": v for k, v in manifest.get("prepare_counts", {}).items()},
                              run_id=run_id)
            mlflow.MlflowClient().set_tag(run_id, "ray.cluster", where)
    except mlflow.exceptions.MlflowException as e:
        raise mlflow_runs.TrackingUnavailable(
            f"cannot use the tracking store {uri} ({outage_cause(e)}); nothing was trained") from e
    layout = f", tp={cfg.parallel.tp}, pp={cfg.parallel.pp}" if cfg.parallel.tp * cfg.parallel.pp > 1 else ""
    counts = worker_counts(cfg)
    workers = f"{counts.start}..{counts.stop - 1} workers (elastic)" if len(counts) > 1 else f"{counts.start} workers"
    print(f"[{task_name}] training on {where}: {workers}, strategy {cfg.strategy.name}"
          f"{layout}, {cfg.precision.dtype}; run {run_name}; MLflow run {run_id}", flush=True)
    recovered = recover(cfg, task_name, run_name)  # damaged checkpoints set aside, unfinished ones removed
    try:
        with mlflow_runs.bounded_requests():
            from mlflow.entities import RunTag

            known = {**(recovered.tags() if recovered else {}), **_known_before_fit(cfg, run_name, recovered, spec)}
            mlflow.MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in known.items()])
    except mlflow.exceptions.MlflowException as e:
        raise mlflow_runs.TrackingUnavailable(
            f"cannot use the tracking store {uri} ({outage_cause(e)}); nothing was trained") from e
    shards = str(shards_dir.resolve())
    if cfg.cluster.shards_uri:  # workers on other nodes read (and cache) a published copy
        shards = publish(shards_dir, f"{cfg.cluster.shards_uri.rstrip('/')}/{task_name}/{manifest_md5}")
        print(f"[{task_name}] shards published to {shards}", flush=True)
    start = time.perf_counter()
    # rank 0 logs the history as it trains: to a server from anywhere, to a SQLite file only from this machine
    live = {"run_id": run_id, "tracking_uri": uri} if embedded() or reachable_from_anywhere(uri) else None
    print(f"[{task_name}] live metrics: {'MLflow run ' + run_id + ' at ' + uri if live else 'after the fit'} "
          f"(tracking store {'reachable from the workers' if live else 'on this machine only'})", flush=True)

    def say(*args: Any, **kwargs: Any) -> None:  # the stage's lines name their task
        print(f"[{task_name}]", *args, **kwargs)

    with mlflow_runs.system_metrics(run_id, say):
        result = fit(cfg, task_name, shards, run_name, live)
        seconds = time.perf_counter() - start  # the training, not the wait for the tracking server after it
        if result.error:  # (once the retries are spent): raised here, so the MLflow run ends FAILED
            raise TrainingFailed(
                f"training failed ({_innermost(result.error, task_name)}); the checkpoints under {run_dir} are "
                f"kept and a rerun resumes from the last one (MLflow run {run_id} ends FAILED)") from result.error
    with result.checkpoint.as_directory() as d:  # open until the weights are copied into the model folder
        meta = read_meta(Path(d))  # the driver needs weights and history, not the optimizer state
        if not meta.get("final"):
            raise RuntimeError(f"[{task_name}] the last checkpoint is not the final one (step {meta['step']})")
        history = meta["history"]
        spec = task_for_data(tcfg.data.kind).model_spec(tcfg, manifest)
        # (no commit here: the run's tags hold it; a rerun at a later commit that resumed the finished run
        # and trained nothing rewrote models/<task> with the new commit, so evaluate, export and register
        # all ran again and registered the same weights as a new version)
        info = {"run_id": run_id, "ray_run": run_name, "tracking_uri": mlflow_runs.portable_store(uri),
                "data_manifest_md5": manifest_md5}
        summary = {"final_loss": history[-1]["loss"], "steps": meta["step"], "skipped_steps": meta["skipped_steps"],
                   # the loop's time over every start (a resume, a rerun that found the run finished)
                   "train_seconds": round(meta.get("train_seconds", seconds), 1),
                   **{k: v for k, v in history[-1].items() if k.endswith("_per_s") or k == "mfu"}}
        if "mfu_peak_tflops" in meta.get("implementation", {}):  # the peak MFU was measured against
            summary["peak_tflops"] = float(meta["implementation"]["mfu_peak_tflops"])
        # the step whose weights go on: the last, or the best validation's (trainer.export_weights)
        weights_step = meta.get("weights_step", meta["step"])
        if weights_step != meta["step"]:
            summary.update(weights_step=weights_step, weights_val_loss=meta["tracker"]["best"])
            info["weights_step"] = weights_step  # in the model folder: lineage names the step
        if compiled := [h["compile_s"] for h in history if "compile_s" in h]:  # trainer.compile: the last start's
            summary["compile_s"] = compiled[-1]
        # reports/<task>/loss.png: train and validation loss, the learning rate beneath (DVC plots it too)
        loss_plot = plots.write_loss_plot(
            history, reports_dir / "loss.png", f"{task_name}: {mlflow_runs.model_label(tcfg.model)}, "
            f"{cfg.strategy.name}, {meta['step']} steps",
            weights_step if weights_step != meta["step"] else None) if reports_dir is not None else None
        # Rank 0 logged the history while it trained (pipeline/tracking/live.py); what it could not send
        # (server down, or no live logging) is logged here from the final checkpoint, which holds every
        # step. MLflow's HTTP client retries with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES); if the server
        # stays down, the stage fails with one line and nothing is lost: the Ray run and its final
        # checkpoint stay, and a rerun resumes the finished run and logs it, with no retraining. Each
        # request is bounded (`bounded_requests`), and a server that hangs is named in one line.
        try:
            with mlflow_runs.bounded_requests(), mlflow_runs.waiting(f"logging the history to run {run_id}", say):
                filled = fill_missing(run_id, history)  # what live logging could not send, never a step twice
                if live and filled:
                    print(f"[{task_name}] {filled} metric values logged after the fit (the live logger could not "
                          "send them)", flush=True)
                # (a checkpoint from before the count has none in its meta)
                parameters = meta.get("parameters") or _parameter_count(spec, Path(d) / WEIGHTS)
                mlflow.MlflowClient().set_tag(run_id, "model.parameters", str(parameters))
                if loss_plot is not None:
                    mlflow.MlflowClient().log_artifact(run_id, str(loss_plot), "training")
                for key, value in meta.get("implementation", {}).items():  # what actually ran: backend, kernels
                    mlflow.MlflowClient().set_tag(run_id, f"impl.{key}", value)
                # the run's totals at its last step (throughput and MFU are in the history already); a rerun
                # adds none twice
                totals = {k: v for k, v in summary.items() if k not in history[-1]}
                fill_missing(run_id, [{"step": meta["step"], **totals}])
        except mlflow.exceptions.MlflowException as e:
            raise mlflow_runs.TrackingUnavailable(
                f"training finished, but logging run {run_id} to {uri} failed "
                f"({outage_cause(e)}). The final checkpoint is kept under {run_dir}; rerun the "
                "stage when the tracking server is back: it resumes the finished run and logs it without "
                "retraining") from e
        write_model(model_dir, Path(d) / WEIGHTS, spec, {mlflow_runs.RUN_FILE: json.dumps(info, indent=2)})
    # atomic: DVC, `dvc metrics` and a reader never see half a file (a crash mid-write, a full disk)
    atomic_write_text(metrics_dir / "train.json", json.dumps(summary, indent=2))
    atomic_write_text(metrics_dir / "train_history.csv", _history_csv(history))
    return TrainOutcome(run_id, run_name, history[-1]["loss"], meta["step"], summary["train_seconds"])
