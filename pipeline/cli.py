"""Command-line plumbing: the shared entry for stages, and the `pipeline` command.

Every stage takes the task name (`lm`, `diffusion`, ...) and optional `key=value` overrides,
validates the whole config first, and turns known errors into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.config import ConfigError, PipelineConfig, compose, load_config, validate


def _known_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (config, data, files) or a diverged run (non-finite losses: a
    setting to change, not a bug), reported as one line.

    Set PIPELINE_DEBUG=1 to get the traceback instead, e.g. when a ValueError may be a bug.
    """
    if os.environ.get("PIPELINE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return ()
    from pipeline.data.shard_format import ShardError
    from pipeline.data.sources import DataSourceError
    from pipeline.flows.train import TrainingFailed
    from pipeline.runtime.connect import ClusterUnavailable
    from pipeline.tracking.mlflow_runs import TrackingUnavailable
    from pipeline.training.checkpoint import CheckpointError
    from pipeline.training.loop import NonFiniteError  # (a diverged run: its message says what to change)

    # (PermissionError's text names the file: "[Errno 13] Permission denied: 'data/raw/a.txt'")
    return (ConfigError, FileNotFoundError, PermissionError, KeyError, ValueError, ShardError, DataSourceError,
            CheckpointError,
            TrackingUnavailable, ClusterUnavailable, ConnectionError,  # (an address nothing answers at)
            NonFiniteError, TrainingFailed)


def stage_main(stage: str, run: Callable[[PipelineConfig, str], None], argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"stages.{stage}", description=f"Run the {stage} stage for one task.")
    parser.add_argument("task", help="task name under `tasks:` in params.yaml (lm, diffusion)")
    # (default=[]: without a default argparse marks a "*" positional required, and its usage error
    # then lists it: "the following arguments are required: task, overrides")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="optional key=value config overrides, e.g. tasks.lm.trainer.max_steps=50")
    parser.add_argument("--params", default="params.yaml", help="composed config file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params, args.overrides)
        cfg.task(args.task)
        run(cfg, args.task)
    except _known_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error [{stage} {args.task}]: {msg}", file=sys.stderr)
        sys.exit(2)


def _plain_file(path: str, flag: str) -> Path:
    """Where a file given as `flag` is written in one swap: through a link to its target (the
    swap replaced the link with a file, leaving the target as it was); a folder or a device
    (`/dev/stdout` became a regular file when run as root) is one line."""
    real = Path(path).resolve()
    if real.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; name the file to write (e.g. {Path(path) / 'params.yaml'})")
    if real.exists() and not real.is_file():
        raise ConfigError(f"{flag} {path}: is not a regular file; `{flag} -` prints to stdout")
    return real


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipeline", description="Pipeline utilities.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compose", help="compose configs/ with Hydra into params.yaml (what `dvc exp run` does)")
    c.add_argument("overrides", nargs="*", default=[],
                   help="optional Hydra overrides, e.g. 'model@tasks.lm.model=gpt_tiny'")
    c.add_argument("--config-dir", default="configs", help="the Hydra config folder (default: configs)")
    c.add_argument("--out", default="params.yaml",
                   help="where to write the composed config (default: params.yaml; - prints it)")
    v = sub.add_parser("validate", help="validate params.yaml, and that each task can train with it (the train "
                                        "stage's checks that need no data); print the first problem")
    v.add_argument("--params", default="params.yaml", help="the config file to check (default: params.yaml)")
    v.add_argument("--task", action="append", default=None,
                   help="check only this task's training (repeat; default: every task, as `dvc repro` trains)")
    lin = sub.add_parser("lineage", help="where a registered model came from: run, config, data, commit")
    lin.add_argument("ref", help="<model>@<alias> or <model>@<version>, e.g. pipeline-lm@champion")
    lin.add_argument("--json", action="store_true", help="print JSON instead of text")
    pro = sub.add_parser("promote", help="point an alias at a version by hand (promote or roll back)")
    pro.add_argument("ref", help="<model>@<version> (or <model>@<alias>) to point the alias at")
    pro.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    rep = sub.add_parser("reproduce", help="re-run the pipeline at a version's commit and compare its metrics")
    rep.add_argument("ref", help="<model>@<alias> or <model>@<version>")
    rep.add_argument("--workdir", default=None, help="where to check the commit out (default: a temporary dir)")
    rep.add_argument("--tolerance", type=float, default=1e-3,
                     help="largest relative metric difference accepted (default 1e-3)")
    for p in (lin, pro, rep):
        p.add_argument("--params", default="params.yaml", help="where the tracking URI comes from")
        p.add_argument("--tracking-uri", default=None, help="overrides the config's tracking.uri")
        p.add_argument("--connect-timeout", type=float, default=None,
                       help="seconds to wait for a tracking server (default: the config's tracking.connect_timeout_s)")
    gen = sub.add_parser("generate", help="complete prompts with the language model: an export folder (default "
                                          "export/lm) or a registered version, as `mlflow models serve` would")
    gen.add_argument("prompts", nargs="+", help="the prompts ('-' reads one per line from stdin)")
    gen.add_argument("--model", default="export/lm",
                     help="an export folder (export/lm: weights and tokenizer) or a registry URI, e.g. "
                          "models:/pipeline-lm@champion")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    gen.add_argument("--min-new-tokens", type=int, default=1,
                     help="tokens to generate before the end-of-document token may end it (default 1)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--seed", type=int, default=0, help="the sampling generator's seed (default 0)")
    gen.add_argument("--params", default="params.yaml", help="where a registry URI's tracking store comes from")
    gen.add_argument("--tracking-uri", default=None, help="overrides the config's tracking.uri")
    gen.add_argument("--connect-timeout", type=float, default=None,
                     help="seconds to wait for a tracking server (default: the config's tracking.connect_timeout_s)")
    _job_parsers(sub)
    sw = sub.add_parser("sweep", help="hyperparameter search with Ray Tune (Optuna + ASHA), every trial an MLflow run")
    sw.add_argument("task", help="task under `tasks:` (lm, diffusion); its shards must exist (dvc repro shard@<task>)")
    sw.add_argument("--space", default=None, help="search space file (default: configs/sweep/<task>.yaml)")
    sw.add_argument("--trials", type=int, default=None, help="number of trials (default: the file's num_samples)")
    sw.add_argument("--seed", type=int, default=None, help="Optuna's seed (default: the config's seed)")
    sw.add_argument("--params", default="params.yaml")
    pl = sub.add_parser("plan", help="per-rank memory of a training step (parameters, gradients, optimizer state, "
                                     "activations, buffers) and the largest micro-batch that fits; no GPU, no Ray")
    pl.add_argument("task", help="task under `tasks:` (lm, diffusion)")
    pl.add_argument("overrides", nargs="*", default=[],  # (optional: see stage_main)
                    help="optional key=value overrides of params.yaml (with --compose: Hydra overrides of "
                         "configs/, e.g. 'model@tasks.lm.model=gpt_7b')")
    pl.add_argument("--params", default="params.yaml")
    pl.add_argument("--compose", action="store_true", help="compose configs/ with Hydra instead of reading --params")
    pl.add_argument("--workers", type=int, default=None, help="ranks, dp x tp x pp (default: cluster.num_workers)")
    pl.add_argument("--device-memory", default=None, help="memory of one device, e.g. 80GiB "
                                                          "(default: cluster.device_memory)")
    pl.add_argument("--target", choices=("cuda", "cpu"), default=None,
                    help="what the ranks run on (default: cuda if cluster.use_gpu, else cpu)")
    pl.add_argument("--micro-batch", type=int, default=None, help="plan this micro-batch instead of the configured one")
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd in ("plan", "compose") and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # overrides after an option (`plan lm --workers 8 parallel.tp=2`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.cmd in ("lineage", "promote", "reproduce"):
            _registry_command(args)
        elif args.cmd in ("submit", "status", "logs", "stop"):
            _job_command(args)
        elif args.cmd == "sweep":
            from pipeline.flows.sweep import run_sweep

            res = run_sweep(Path(args.params), args.task, Path(args.space or f"configs/sweep/{args.task}.yaml"),
                            Path(f"data/{args.task}/shards"), args.trials, args.seed)
            print(f"[sweep {args.task}] {res.trials} trials, {res.stopped_early} stopped early by ASHA; best val_loss "
                  f"{res.best_metric:.4f} with " + ", ".join(f"{k}={v}" for k, v in res.best_point.items()))
            print(f"[sweep {args.task}] train it through the pipeline:\n{res.command}")
        elif args.cmd == "plan":
            _plan_command(args)
        elif args.cmd == "generate":
            _generate_command(args)
        elif args.cmd == "compose":
            from pipeline.atomic import atomic_write_text

            raw = compose(args.config_dir, args.overrides)
            validate(raw)
            text = yaml.safe_dump(raw, sort_keys=False)
            if args.out == "-":
                print(text, end="")
            else:
                atomic_write_text(_plain_file(args.out, "--out"), text)  # DVC stages read it
                print(f"wrote {args.out}")
        else:
            from pipeline.distributed import check_gpu_host, preflight
            from pipeline.training.optim import check_kernels

            cfg = load_config(args.params)
            check_tasks(cfg, args.task)
            # what this machine decides (a GPU, DeepSpeed or Horovod installed, CPU fp16, Apex): the train
            # stage refuses it here, while a job submitted to a cluster that has them runs it
            for check in (check_gpu_host, lambda c: preflight(c, c.cluster.use_gpu), check_kernels):
                try:
                    check(cfg)
                except ValueError as e:
                    print(f"warning: {e} (the train stage refuses it on this machine; `pipeline submit` to a "
                          "cluster that has it is fine)", file=sys.stderr)
                    break  # (one line: the checks after it assume it passed)
            print(f"{args.params}: ok")
    except _known_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def check_tasks(cfg: PipelineConfig, tasks: list[str] | None) -> None:
    """The train stage's config checks for `tasks` (default: every task), before any stage runs:
    a layout, batch or precision a task cannot train with is named now, not after prepare and
    shard (or a cluster's queue)."""
    from pipeline.flows.train import check_task_config

    for name in tasks or list(cfg.tasks):
        try:
            check_task_config(cfg, name)
        except ValueError as e:
            raise ValueError(f"[{name}] {e}") from None


def _generate_command(args: argparse.Namespace) -> None:
    """`pipeline generate`: the served model's `predict` on prompts from the command line, from an
    export folder (checked against its checksums) or a registered version (loaded as `mlflow
    models serve` loads it). Each completion is printed after its prompt."""
    import pandas as pd

    from pipeline.export.pyfunc import PipelineModel, lm_params

    prompts = [line.rstrip("\n") for line in sys.stdin] if args.prompts == ["-"] else args.prompts
    params = lm_params({"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
                        "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed})
    frame = pd.DataFrame({"prompt": prompts})
    if "://" in args.model or args.model.startswith("models:"):
        import mlflow

        _open_store(args)
        if args.model.startswith("models:/"):  # an unknown name, alias or version: one line, not a traceback
            from mlflow.tracking import MlflowClient

            from pipeline.tracking.inspect import resolve

            resolve(MlflowClient(), args.model.removeprefix("models:/"))
        completions = mlflow.pyfunc.load_model(args.model).predict(frame, params=params)["completion"]
    else:
        folder = Path(args.model)
        if not (folder / "model_spec.json").is_file():
            raise FileNotFoundError(f"{folder}: no exported model here (model_spec.json); run `dvc repro export@lm`, "
                                    "or pass --model models:/pipeline-lm@champion")
        model = PipelineModel()
        model.load(folder)
        if model.spec["task"] != "lm":
            raise ValueError(f"{folder} holds a {model.spec['task']} model: `pipeline generate` completes text with "
                             "the language model (export/lm)")
        completions = model.predict(None, frame, params)["completion"]
    for prompt, completion in zip(prompts, completions, strict=True):
        print(f"{prompt}{completion}" if len(prompts) == 1 else f"--- {prompt!r}\n{prompt}{completion}")


def _plan_command(args: argparse.Namespace) -> None:
    """`pipeline plan`: the memory planner on the composed config (no GPU, no Ray)."""
    from pipeline.config.elastic import worker_counts
    from pipeline.config.sizes import parse_size
    from pipeline.data.shard_format import MANIFEST, load_manifest
    from pipeline.distributed.planner import format_elastic, format_plan, plan, worst_with_suggestion

    if args.device_memory is not None:
        try:
            parse_size(args.device_memory)
        except ValueError as e:
            raise ValueError(f"--device-memory: {e}") from None
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers: must be at least 1 (got {args.workers})")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise ValueError(f"--micro-batch: must be at least 1 (got {args.micro_batch})")
    cfg = validate(compose("configs", args.overrides)) if args.compose else load_config(args.params, args.overrides)
    cfg.task(args.task)
    shards = Path(f"data/{args.task}/shards")
    # Image shape and class count come from the shards when they exist; text sizes from the config.
    manifest = load_manifest(shards) if (shards / MANIFEST).is_file() and cfg.task(args.task).data.kind != "text" \
        else None
    counts = worker_counts(cfg)
    elastic = args.workers is None and args.micro_batch is None and len(counts) > 1
    p = plan(cfg, args.task, workers=args.workers, device_memory=args.device_memory, target=args.target,
             micro_batch=args.micro_batch, manifest=manifest, suggest=not elastic)
    print(format_plan(p))
    fits = p.fits is not False
    if elastic:
        # an elastic run may train on fewer workers (the train stage checks them all): show each count,
        # and suggest what fits at the worst of them, as the train stage's check does
        others = [plan(cfg, args.task, workers=w, device_memory=args.device_memory, target=args.target,
                       manifest=manifest, suggest=False) for w in counts]
        print(format_elastic(others, cfg.cluster.num_workers))
        worst = worst_with_suggestion(cfg, args.task, others, manifest)
        if worst is not None:
            print(f"on {worst.workers} worker{'s' if worst.workers > 1 else ''}: {worst.suggestion}")
        fits = fits and worst is None
    if not fits:  # a script can tell: the planned micro-batch does not fit the device memory given
        sys.exit(1)


def job_entrypoint(remainder: list[str]) -> list[str]:
    """The command `pipeline submit ... -- CMD` runs (default `dvc repro`): only the separator before
    it goes; a `--` the command passes on to its own program stays (all of them were dropped)."""
    return (remainder[1:] if remainder[:1] == ["--"] else remainder) or ["dvc", "repro"]


def _open_store(args: argparse.Namespace) -> None:
    """Point MLflow at the tracking store of `--tracking-uri` or the config, once it is known to be
    there: a SQLite file that does not exist (MLflow would create an empty store to look in) or a
    server that does not answer (MLflow's minutes of retries) is one line."""
    import mlflow

    from pipeline.tracking import inspect
    from pipeline.tracking.mlflow_runs import sqlite_file, tracking_uri

    if args.connect_timeout is not None and args.connect_timeout <= 0:
        raise ValueError(f"--connect-timeout: must be positive (got {args.connect_timeout})")
    tracking = None if args.tracking_uri else load_config(args.params).tracking
    uri = args.tracking_uri or tracking_uri(tracking)
    timeout = args.connect_timeout or (tracking.connect_timeout_s if tracking else None)
    store = sqlite_file(uri)
    if store is not None and not store.is_file():  # (MLflow would create an empty store to look in)
        raise FileNotFoundError(f"no tracking store at {uri}: nothing has been registered here yet (run `make repro` "
                                "or `dvc repro` first, or pass --tracking-uri)")
    # a server that does not answer: one line in seconds, not MLflow's minutes of retries
    # (with --tracking-uri no config is read: the flag is what sets the wait)
    inspect.check_store(uri, timeout, "--connect-timeout" if args.tracking_uri or args.connect_timeout
                        else "tracking.connect_timeout_s")
    mlflow.set_tracking_uri(uri)


def _registry_command(args: argparse.Namespace) -> None:
    import json

    from pipeline.tracking import inspect

    if args.cmd == "promote":  # (before the store is asked anything)
        inspect.check_alias(args.alias)
    if args.cmd == "reproduce" and not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
        # (before a whole `dvc repro` whose metrics no tolerance could then accept)
        raise ValueError(f"--tolerance: a finite relative difference, at least 0 (got {args.tolerance})")
    _open_store(args)
    if args.cmd == "promote":
        print(inspect.promote(args.ref, args.alias))
        return
    if args.cmd == "reproduce":
        from pipeline.flows.reproduce import format_comparison, reproduce

        rows, ok = reproduce(args.ref, Path(args.workdir) if args.workdir else None, args.tolerance)
        print(format_comparison(rows, args.tolerance))
        print("reproduced within tolerance" if ok else "NOT reproduced within tolerance")
        sys.exit(0 if ok else 1)
    info = inspect.lineage(args.ref)
    print(json.dumps(info, indent=2, default=str) if args.json else inspect.format_lineage(info))


def _job_parsers(sub: argparse._SubParsersAction) -> None:
    address = {"default": None, "help": "Jobs API address (default: RAY_JOBS_ADDRESS, an http RAY_ADDRESS, "
                                        "or http://127.0.0.1:8265)"}
    s = sub.add_parser("submit", help="run a command (default: dvc repro) on a Ray cluster through the Jobs API",
                       description="Uploads this checkout as the job's working_dir and streams the job's log. "
                                   "Exit 0 when the job succeeds, 1 when it fails (with its log tail).")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER,
                   help="after --: the command to run, e.g. -- python -m stages.train lm (default: dvc repro)")
    s.add_argument("--address", **address)
    s.add_argument("--runtime-env", default=None, help="runtime_env YAML (default: cluster/runtime_env.yaml)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="env var for the job (repeat)")
    s.add_argument("--pip", action="append", default=None, help="pip requirement for the job (repeat); "
                                                                "replaces the file's list")
    s.add_argument("--no-pip", action="store_true", help="install nothing: the cluster already has the project")
    s.add_argument("--id", default=None, help="submission id (default: generated)")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.add_argument("--params", default="params.yaml", help="validated before anything is submitted")
    for name, text in (("status", "a job's status"), ("logs", "a job's log"), ("stop", "stop a running job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", **address)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")


def _job_command(args: argparse.Namespace) -> None:
    from pipeline.runtime import jobs

    if args.cmd == "status":
        state = jobs.status(args.job_id, args.address)
        took = f" after {state.seconds:.0f} s" if state.seconds is not None else ""
        print(f"{state.job_id}: {state.status}{took}" + (f" ({state.message})" if state.message else ""))
        return
    if args.cmd == "stop":
        print(f"{args.job_id}: " + ("stop requested" if jobs.stop(args.job_id, args.address) else "not running"))
        return
    if args.cmd == "logs" and not args.follow:
        print(jobs.logs(args.job_id, args.address), end="")
        return
    if args.cmd == "submit":
        cfg = load_config(args.params)  # a bad config fails here, before the cluster is asked for anything
        entry = job_entrypoint(args.entrypoint)
        if entry == ["dvc", "repro"]:  # every task trains: each must be able to, before the cluster works for hours
            check_tasks(cfg, None)
        env = {}
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--env {item!r}: expected KEY=VALUE")
            env[key] = value
        spec = jobs.runtime_env(Path.cwd(), Path(args.runtime_env) if args.runtime_env else None, env,
                                [] if args.no_pip else args.pip)
        import shlex

        command = entry[0] if len(entry) == 1 else shlex.join(entry)  # one argument: a shell line as is
        try:
            job_id = jobs.submit(command, args.address, spec, args.id)
        except jobs.ClusterUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"submitted {job_id} to {jobs.jobs_address(args.address)}: {command}", flush=True)
        if args.no_wait:
            return
        args.job_id = job_id
    try:
        state = jobs.follow(args.job_id, args.address)
    except jobs.JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{state.job_id}: {state.status}" + (f" after {state.seconds:.0f} s" if state.seconds else ""))
