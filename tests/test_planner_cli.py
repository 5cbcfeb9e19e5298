"""The memory planner as a user meets it: sizes in the config, `pipeline plan`, the train stage's
`check_fits` (every worker count of an elastic range) and the fix it suggests. (`pytest -k planner`
selects these with tests/test_planner.py.)
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pipeline.config import validate
from pipeline.config.sizes import parse_size
from tests.conftest import ROOT, tiny_raw
from tests.test_planner import SMALL  # the small GPT both files plan


def test_planner_parses_sizes_and_names_the_key():
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size(2**30) == parse_size("1073741824") == 2**30  # bytes
    for bad in ("80Gx", "-1GiB", "GiB", True):
        with pytest.raises(ValueError):
            parse_size(bad)
    for unit_left_out in (80, "80", "1.5"):  # not a device of 80 bytes
        with pytest.raises(ValueError, match=r"with no unit is \d+ bytes, less than 1 MiB: write the unit, e.g. "):
            parse_size(unit_left_out)
    with pytest.raises(Exception, match=r"cluster.device_memory: expected a size"):
        validate(tiny_raw(["cluster.device_memory=lots"]))
    assert validate(tiny_raw(["cluster.device_memory=8GiB"])).cluster.device_memory == "8GiB"


def test_planner_cli_prints_the_breakdown_and_names_a_bad_flag(tmp_path):
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(SMALL)))
    run = [sys.executable, "-m", "pipeline", "plan", "lm", "strategy.name=fsdp", "--params", str(params)]
    proc = subprocess.run([*run, "--workers", "4", "--device-memory", "2GiB"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for row in ("parameters", "gradients", "optimizer state", "activations", "communication buffers", "total",
                "largest micro-batch that fits"):
        assert row in proc.stdout
    bad = subprocess.run([*run, "--device-memory", "80Gx"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --device-memory: expected a size such as 80GiB, 512MiB or a number of bytes (got '80Gx')"]


def test_planner_cli_overrides_are_optional(monkeypatch, capsys):
    """`plan <task>` needs no overrides; its usage error said "required: task, overrides" (an
    argparse "*" positional without a default counts as required)."""
    from pipeline import cli

    seen: list = []
    monkeypatch.setattr(cli, "_plan_command", seen.append)
    cli.main(["plan", "lm"])
    cli.main(["plan", "lm", "--workers", "8", "parallel.tp=2"])
    assert [args.overrides for args in seen] == [[], ["parallel.tp=2"]]
    with pytest.raises(SystemExit) as e:
        cli.main(["plan"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: the following arguments are required: task")
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    out = capsys.readouterr().out
    assert "task [overrides ...]" in out and "optional key=value overrides" in out


def test_planner_refuses_what_cannot_fit_and_names_the_fix():
    """The train stage's check: one line, starting with the key, naming a micro-batch or a strategy."""
    from pipeline.distributed.planner import check_fits, plan

    cfg = validate(tiny_raw(SMALL))
    assert check_fits(cfg, "lm") is None  # no device_memory: no check
    need = plan(cfg, "lm", workers=2)
    fits = validate(tiny_raw([*SMALL, f"cluster.device_memory={need.total}"]))
    assert check_fits(fits, "lm") is not None
    smaller = validate(tiny_raw([*SMALL, f"cluster.device_memory={need.total - 1}"]))
    with pytest.raises(ValueError) as err:
        check_fits(smaller, "lm")
    msg = str(err.value)
    assert msg.startswith("cluster.device_memory: tasks.lm needs") and "\n" not in msg
    assert "grad_accum_steps=" in msg or "lower" in msg
    static = plan(cfg, "lm", workers=2, micro_batch=1).device
    tight = validate(tiny_raw([*SMALL, f"cluster.device_memory={static.params + static.optimizer}"]))
    with pytest.raises(ValueError, match=r"^cluster.device_memory: .*would fit"):
        check_fits(tight, "lm")


def test_planner_check_fits_plans_every_elastic_worker_count():
    """An elastic run keeps the global batch at fewer workers, so a rank's micro-batch grows
    (8 at 1 worker, 4 at 2): memory that fits at cluster.num_workers but not at min_workers is
    refused, naming the worker count, with an accumulation that splits at every count."""
    from pipeline.distributed.planner import check_fits, plan

    at = {w: plan(validate(tiny_raw(SMALL)), "lm", workers=w, suggest=False) for w in (1, 2)}
    assert (at[1].micro_batch, at[2].micro_batch) == (8, 4) and at[1].total > at[2].total
    between = f"cluster.device_memory={at[1].total - 1}"
    assert check_fits(validate(tiny_raw([*SMALL, between])), "lm").workers == 2  # not elastic: 2 workers fit
    elastic = validate(tiny_raw([*SMALL, between, "cluster.min_workers=1"]))
    with pytest.raises(ValueError) as err:
        check_fits(elastic, "lm")
    msg = str(err.value)
    assert msg.startswith("cluster.device_memory: tasks.lm needs ") and "\n" not in msg
    assert "at micro-batch 8 on 1 worker (elastic: cluster.min_workers..cluster.num_workers = 1..2; ddp" in msg
    assert "set tasks.lm.trainer.grad_accum_steps=2 (micro-batch 4)" in msg and "plan lm --workers 1 shows" in msg
    fits = validate(tiny_raw([*SMALL, f"cluster.device_memory={at[1].total}", "cluster.min_workers=1"]))
    assert check_fits(fits, "lm").workers == 2  # every count fits: the plan at num_workers, as before
    # global batch 12 over 2..3 workers: grad_accum_steps=3 gives micro-batch 2 at 2 workers but does not
    # split at 3 (check_task_elastic would refuse it), so it is not suggested
    wide = [*SMALL, "tasks.lm.trainer.global_batch_size=12", "cluster.num_workers=3", "cluster.min_workers=2"]
    two = plan(validate(tiny_raw(wide)), "lm", workers=2, micro_batch=2, suggest=False).total
    with pytest.raises(ValueError, match=r"on 2 workers .* 2 does: lower tasks.lm.trainer.global_batch_size"):
        check_fits(validate(tiny_raw([*wide, f"cluster.device_memory={two}"])), "lm")


def test_planner_cli_shows_every_elastic_worker_count(tmp_path, capsys):
    """`pipeline plan` on an elastic config planned only cluster.num_workers, so it said "fits"
    where the train stage (which plans every count) then refused: it now lists each count and
    exits 1 when any does not fit."""
    import yaml

    from pipeline import cli
    from pipeline.distributed.planner import check_fits, plan

    at1 = plan(validate(tiny_raw(SMALL)), "lm", workers=1, suggest=False).total
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw([*SMALL, "cluster.min_workers=1", f"cluster.device_memory={at1 - 1}"])))
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "lm", "--params", str(params)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "memory plan: lm" in out and "2 workers" in out and "micro-batch 4 fits" in out  # num_workers fits
    rows = out.split("elastic (cluster.min_workers..cluster.num_workers = 1..2), per rank:\n")[1].splitlines()
    assert rows[0].split()[:4] == ["1", "worker", "micro-batch", "8"] and rows[0].endswith("does NOT fit")
    assert rows[1].split()[:4] == ["2", "workers", "micro-batch", "4"] and rows[1].endswith("  fits")
    assert out.rstrip().splitlines()[-1] == "on 1 worker: micro-batch 8 does not fit, 7 does: set " \
        "tasks.lm.trainer.grad_accum_steps=2 (micro-batch 4)"  # the train stage's suggestion, for the worst count
    cli.main(["plan", "lm", "--params", str(params), "--workers", "2"])  # one count asked for: that one only
    assert "elastic" not in capsys.readouterr().out
    # neither count fits: the suggestion was made for num_workers alone (grad_accum_steps for 2 workers, which
    # still left 1 worker over, and the train stage then suggested another); it is now the worst count's
    at2 = plan(validate(tiny_raw(SMALL)), "lm", workers=2, suggest=False).total
    tight = tiny_raw([*SMALL, "cluster.min_workers=1", f"cluster.device_memory={at2 - 1}"])
    params.write_text(yaml.safe_dump(tight))
    with pytest.raises(SystemExit):
        cli.main(["plan", "lm", "--params", str(params)])
    out = capsys.readouterr().out
    with pytest.raises(ValueError) as refused:
        check_fits(validate(tight), "lm")
    suggested = out.rstrip().splitlines()[-1]
    assert suggested.startswith("on 1 worker: ") and suggested.removeprefix("on 1 worker: ") in str(refused.value)
    fix = suggested.split("set ")[1].split(" ")[0]
    assert check_fits(validate(tiny_raw([*SMALL, "cluster.min_workers=1", f"cluster.device_memory={at2 - 1}", fix])),
                      "lm") is not None  # applied, every count fits


def test_planner_suggestion_starts_from_the_configured_accumulation():
    """`pipeline plan --micro-batch 100000` on a device where the configured micro-batch fits
    said "set grad_accum_steps=2" (one step more than configured, a smaller micro-batch than
    needed); it says the configured one fits, and names an accumulation only where it does not."""
    from pipeline.distributed.planner import plan

    cfg = validate(tiny_raw(SMALL))  # global batch 8 on 2 workers: micro-batch 4
    at4 = plan(cfg, "lm", workers=2, suggest=False).total
    p = plan(cfg, "lm", workers=2, device_memory=at4, micro_batch=100000)
    assert p.largest_micro_batch >= 4
    assert p.suggestion == (f"micro-batch 100000 does not fit, {p.largest_micro_batch} does: the configured "
                            "micro-batch 4 fits")
    accum2 = validate(tiny_raw([*SMALL, "tasks.lm.trainer.grad_accum_steps=2"]))  # micro-batch 2
    at2 = plan(accum2, "lm", workers=2, suggest=False).total
    p = plan(accum2, "lm", workers=2, device_memory=at2, micro_batch=100000)
    assert p.suggestion.endswith("the configured micro-batch 2 fits"), p.suggestion
    p = plan(cfg, "lm", workers=2, device_memory=at4 - 1)  # the configured 4 does not fit
    assert p.suggestion.endswith("set tasks.lm.trainer.grad_accum_steps=2 (micro-batch 2)"), p.suggestion


def test_planner_suggests_checkpointing_by_op_before_full():
    """Where micro-batch 1 fits only with less activation memory, the suggestion is the cheapest
    recomputation that fits: checkpointing by operator before full checkpointing."""
    from pipeline.distributed.planner import check_fits, plan

    long = ["tasks.lm.model.d_model=128", "tasks.lm.model.n_layers=4", "tasks.lm.model.n_heads=4",
            "tasks.lm.data.seq_len=1024", "tasks.lm.data.vocab_size=512"]  # activations outweigh the weights

    def need(*ac: str) -> int:
        return plan(validate(tiny_raw([*long, *ac])), "lm", workers=2, micro_batch=1).total

    plain = need()
    by_op = need("tasks.lm.trainer.activation_checkpointing=selective", "tasks.lm.trainer.ac_selective=op")
    full = need("tasks.lm.trainer.activation_checkpointing=full")
    assert full < by_op < plain, (full, by_op, plain)
    for memory, suggestion in ((by_op, "activation_checkpointing=selective tasks.lm.trainer.ac_selective=op"),
                               (by_op - 1, "activation_checkpointing=full")):
        cfg = validate(tiny_raw([*long, f"cluster.device_memory={memory}"]))
        with pytest.raises(ValueError, match=rf"^cluster.device_memory: .*; tasks.lm.trainer.{suggestion} would fit"):
            check_fits(cfg, "lm")


def test_suggestions_are_only_layouts_the_config_can_train_with():
    """With trainer.compile set, the suggestion search built a ZeRO-3 config, which compile refuses:
    the plan died of a validation error about a strategy nobody asked for, where FSDP2 would fit.
    Under fp8 it built DeepSpeed's precision without the emulation and died of "fp8 needs a GPU" (and
    fp8 trains under ddp or fsdp only). Now each is a plan with a suggestion it can act on."""
    from pipeline.distributed.planner.planning import check_fits, plan

    base = ["cluster.num_workers=2", "tasks.lm.trainer.activation_checkpointing=full",
            "tasks.lm.trainer.compile=blocks"]
    ddp = plan(validate(tiny_raw(base)), "lm", workers=2, target="cpu", micro_batch=1, suggest=False).total
    fsdp = plan(validate(tiny_raw([*base, "strategy.name=fsdp"])), "lm", workers=2, target="cpu", micro_batch=1,
                suggest=False).total
    assert fsdp < ddp
    between = validate(tiny_raw([*base, f"cluster.device_memory={(ddp + fsdp) // 2}"]))
    with pytest.raises(ValueError, match=r"nothing fits at micro-batch 1; strategy\.name=fsdp would fit"):
        check_fits(between, "lm")
    fp8 = validate(tiny_raw(["cluster.num_workers=2", "precision.dtype=fp8", "precision.fp8_emulate=true"]))
    suggestion = plan(fp8, "lm", workers=2, device_memory="1KiB", target="cpu").suggestion
    assert suggestion.startswith("nothing fits at micro-batch 1") and "deepspeed" not in suggestion


PP = [*SMALL, "cluster.num_workers=2", "parallel.pp=2", "strategy.name=fsdp"]  # two stages, one block each


def _followed(raw: list[str], suggestion: str, memory: int):
    """The plan of the config a suggestion's grad_accum_steps gives (None when it names none)."""
    from pipeline.config.parallel import check_task_parallel
    from pipeline.distributed.planner import plan

    m = re.search(r"grad_accum_steps=(\d+)", suggestion)
    if m is None:
        return None
    cfg = validate(tiny_raw([*raw, f"tasks.lm.trainer.grad_accum_steps={m.group(1)}"]))
    check_task_parallel(cfg, "lm")  # the train stage takes it
    return plan(cfg, "lm", workers=2, target="cpu", device_memory=memory, suggest=False)


def test_planner_refuses_a_pipeline_layout_the_train_stage_refuses(tmp_path, capsys):
    """`pipeline plan` (and `check_fits`) printed a plan, exit 0, for 1F1B with fewer micro-batches
    than stages, which the train stage then refused: they refuse it with the train stage's line."""
    import yaml

    from pipeline import cli
    from pipeline.distributed.planner import check_fits

    refused = [*PP, "parallel.pp_schedule=1f1b", "tasks.lm.trainer.grad_accum_steps=1"]
    line = ("tasks.lm.trainer.grad_accum_steps (1) is the pipeline's micro-batch count; parallel.pp_schedule=1f1b "
            "needs at least parallel.pp (2) of them")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(refused)))
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "lm", "--params", str(params)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "memory plan" not in captured.out
    assert captured.err.startswith(f"error: {line}") and captured.err.count("\n") == 1
    with pytest.raises(ValueError, match=r"^" + re.escape(line)):
        check_fits(validate(tiny_raw([*refused, "cluster.device_memory=8GiB"])), "lm")


def test_planner_suggests_no_accumulation_the_pipeline_schedule_refuses():
    """Interleaved 1F1B runs its micro-batches in equal rounds: global batch 40 at 4 steps (micro-batch
    10) did not fit (9 does), and the plan said grad_accum_steps=5 (micro-batch 8, which fits: 2 rounds
    of 5 // 2), which the train stage refuses. The suggestion is one it takes (8: micro-batch 5), and it
    fits."""
    from pipeline.distributed.planner import plan

    raw = [*PP, "tasks.lm.model.n_layers=4", "parallel.pp_schedule=interleaved_1f1b",
           "tasks.lm.trainer.global_batch_size=40"]
    cfg = validate(tiny_raw([*raw, "tasks.lm.trainer.grad_accum_steps=4"]))
    memory = plan(cfg, "lm", workers=2, target="cpu", micro_batch=9, suggest=False).total
    p = plan(cfg, "lm", workers=2, target="cpu", device_memory=memory)
    assert p.largest_micro_batch == 9 and p.micro_batch == 10
    assert "grad_accum_steps=5" not in p.suggestion, p.suggestion
    assert p.suggestion.endswith("set tasks.lm.trainer.grad_accum_steps=8 (micro-batch 5)"), p.suggestion
    assert _followed(raw, p.suggestion, memory).fits


def test_planner_gpipe_suggests_only_an_accumulation_that_fits():
    """GPipe holds every micro-batch's forward state until backward, so more, smaller micro-batches
    hold about as much: at 2 steps (micro-batch 32) with room for 17, the plan said grad_accum_steps=4
    (micro-batch 16), which did not fit either (nor did the next suggestion's). Each accumulation is
    now planned at its own micro-batch count: none fits here, so the suggestion is a smaller global
    batch, and that one fits."""
    from pipeline.distributed.planner import plan

    raw = [*PP, "parallel.pp_schedule=gpipe", "tasks.lm.trainer.global_batch_size=64"]
    cfg = validate(tiny_raw([*raw, "tasks.lm.trainer.grad_accum_steps=2"]))
    memory = plan(cfg, "lm", workers=2, target="cpu", micro_batch=17, suggest=False).total
    p = plan(cfg, "lm", workers=2, target="cpu", device_memory=memory)
    assert p.largest_micro_batch == 17 and not p.fits
    followed = _followed(raw, p.suggestion, memory)
    assert followed is None or followed.fits, (p.suggestion, followed.total, memory)
    assert p.suggestion.endswith("17 does: lower tasks.lm.trainer.global_batch_size"), p.suggestion
    smaller = validate(tiny_raw([*PP, "parallel.pp_schedule=gpipe", "tasks.lm.trainer.global_batch_size=34",
                                 "tasks.lm.trainer.grad_accum_steps=2"]))
    assert plan(smaller, "lm", workers=2, target="cpu", device_memory=memory).fits
