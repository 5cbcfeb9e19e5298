"""Command-line plumbing: the shared entry for stages, and the `pipeline` command.

Every stage takes the task name (`lm`, `diffusion`, ...) and optional `key=value` overrides,
validates the whole config first, and turns known errors into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.config import ConfigError, PipelineConfig, compose, load_config, validate


def _known_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (config, data, files), reported as one line.

    Set PIPELINE_DEBUG=1 to get the traceback instead, e.g. when a ValueError may be a bug.
    """
    if os.environ.get("PIPELINE_DEBUG"):
        return ()
    from pipeline.data.shards import ShardError
    from pipeline.data.sources import DataSourceError
    from pipeline.tracking.mlflow_runs import TrackingUnavailable
    from pipeline.training.checkpoint import CheckpointError

    return (ConfigError, FileNotFoundError, KeyError, ValueError, ShardError, DataSourceError, CheckpointError,
            TrackingUnavailable)


def stage_main(stage: str, run: Callable[[PipelineConfig, str], None], argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"stages.{stage}", description=f"Run the {stage} stage for one task.")
    parser.add_argument("task", help="task name under `tasks:` in params.yaml (lm, diffusion)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. tasks.lm.trainer.max_steps=50")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipeline", description="Pipeline utilities.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compose", help="compose configs/ with Hydra into params.yaml (what `dvc exp run` does)")
    c.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. 'model@tasks.lm.model=gpt_tiny'")
    c.add_argument("--config-dir", default="configs")
    c.add_argument("--out", default="params.yaml")
    v = sub.add_parser("validate", help="validate params.yaml and print the first problem")
    v.add_argument("--params", default="params.yaml")
    lin = sub.add_parser("lineage", help="where a registered model came from: run, config, data, commit")
    lin.add_argument("ref", help="<model>@<alias> or <model>@<version>, e.g. pipeline-lm@champion")
    lin.add_argument("--json", action="store_true", help="print JSON instead of text")
    pro = sub.add_parser("promote", help="point an alias at a version by hand (promote or roll back)")
    pro.add_argument("ref", help="<model>@<version> (or <model>@<alias>) to point the alias at")
    pro.add_argument("--alias", default="champion")
    rep = sub.add_parser("reproduce", help="re-run the pipeline at a version's commit and compare its metrics")
    rep.add_argument("ref", help="<model>@<alias> or <model>@<version>")
    rep.add_argument("--workdir", default=None, help="where to check the commit out (default: a temporary dir)")
    rep.add_argument("--tolerance", type=float, default=1e-3, help="largest relative metric difference accepted")
    for p in (lin, pro, rep):
        p.add_argument("--params", default="params.yaml", help="where the tracking URI comes from")
        p.add_argument("--tracking-uri", default=None, help="overrides the config's tracking.uri")
    args = parser.parse_args(argv)
    try:
        if args.cmd in ("lineage", "promote", "reproduce"):
            _registry_command(args)
        elif args.cmd == "compose":
            raw = compose(args.config_dir, args.overrides)
            validate(raw)
            Path(args.out).write_text(yaml.safe_dump(raw, sort_keys=False))
            print(f"wrote {args.out}")
        else:
            load_config(args.params)
            print(f"{args.params}: ok")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _registry_command(args: argparse.Namespace) -> None:
    import json

    import mlflow

    from pipeline.tracking import inspect

    mlflow.set_tracking_uri(args.tracking_uri or load_config(args.params).tracking.uri)
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
