"""The training loop: backend-agnostic, resumable, and exact on resume.

Everything that varies by backend goes through the `Strategy`; everything that varies by
runtime (Ray or a plain process) goes through the session. Per-step randomness (diffusion
noise, timesteps) comes from a generator seeded by (seed, step, rank), so a resumed run draws
the same numbers an uninterrupted one would have.
"""

from __future__ import annotations

import math
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.config.schema import PipelineConfig
from pipeline.data.reader import GlobalOrderReader
from pipeline.data.shard_format import load_manifest
from pipeline.data.shard_store import ShardSet, read_split
from pipeline.distributed import StepSettings, Strategy, build_strategy
from pipeline.distributed.activation import describe_activation_checkpointing
from pipeline.distributed.mesh import Layout
from pipeline.distributed.precision import Precision
from pipeline.models.hf import is_hf_folder
from pipeline.progress import duration
from pipeline.runtime.cuda_allocator import configure_cuda_allocator
from pipeline.tasks import task_for_data
from pipeline.training.best_weights import BestWeights
from pipeline.training.checkpoint import (
    CannotReshard,
    dir_bytes,
    out_of_space,
    read_meta,
    seal_checkpoint,
    storage_full,
    write_weights,
)
from pipeline.training.ema import EMA
from pipeline.training.mfu import device_peak, mfu
from pipeline.training.optim import ValidationTracker, build_optimizer, describe_optimizer, lr_at
from pipeline.training.validation import validation_loss
from pipeline.training.window import StepWindow, WindowValues


class Session(Protocol):
    rank: int
    world: int
    device: torch.device

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...
    def latest_checkpoint(self): ...
    def log_step(self, entry: dict[str, Any]) -> None: ...
    def tag_run(self, tags: dict[str, str]) -> None: ...


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row: the run stops instead of training on NaN."""


@dataclass
class LoopState:
    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    max_steps: int = 0  # the run's length (in its checkpoints: a resume with another length says so)
    # the loop's wall time over every start of the run, carried in its checkpoints: train.json's
    # train_seconds (a resumed run counted only its last start; a rerun that found it finished, ~0)
    train_seconds: float = 0.0


def _check_world(saved: int, world: int, strategy: Strategy, ckpt: Path, task_name: str) -> None:
    """A checkpoint from another number of ranks loads wherever the backend can redistribute
    its state (replicated; DCP reshards); elsewhere the run stops in one line."""
    if saved != world and strategy.reshard_limit is not None:
        raise CannotReshard(f"[{task_name}] the checkpoint {ckpt} was written by {saved} workers and this run has "
                            f"{world}: {strategy.reshard_limit}; set cluster.num_workers={saved} to resume it, or "
                            "start a new run (another cluster.storage_path)")


def dropout_seed(seed: int, step: int, dp_rank: int, pp_rank: int) -> int:
    """The global RNG's seed for a step's dropout masks: per step, so a resumed run draws the
    masks the uninterrupted one did; per data-parallel replica, so each draws its own; per pipeline
    stage, since each stage's layers would otherwise reuse the masks of the stage before (the same
    stream, one call later); the same on a replica's tensor-parallel ranks, whose replicated
    activations must stay equal. Stage 0 keeps the seed runs had before stages were counted."""
    return hash((seed, step, dp_rank, 1) + ((pp_rank,) if pp_rank else ())) % (2**62)


def micro_batch_size(global_batch: int, world: int, accum: int) -> int:
    if global_batch % (world * accum):
        raise ValueError(f"trainer.global_batch_size ({global_batch}) must be divisible by "
                         f"workers x grad_accum_steps ({world} x {accum})")
    return global_batch // (world * accum)


def _split(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    return [{k: v[i::parts] for k, v in batch.items()} for i in range(parts)] if parts > 1 else [batch]


def weights_file(path: str) -> Path:
    """`trainer.init_from` as a file: a safetensors file, a folder holding model.safetensors, or
    a Hugging Face checkpoint folder (config.json and its safetensors; read by its own names)."""
    p = Path(path)
    if is_hf_folder(p):
        return p
    p = p / "model.safetensors" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"trainer.init_from: {p} does not exist")
    return p


def train(cfg: PipelineConfig, task_name: str, shards_root: str | Path, session: Session) -> LoopState:
    """`shards_root` is the shard folder: a local path, or a URL whose shards are cached locally."""
    tcfg = cfg.task(task_name)
    tr = tcfg.trainer
    task = task_for_data(tcfg.data.kind)
    task.label_smoothing = tr.label_smoothing
    if tr.compile != "none" and tr.compile_loss:
        task.compile_loss()
    manifest = load_manifest(shards_root)
    spec = task.model_spec(tcfg, manifest)
    layout = Layout(session.world, cfg.parallel.tp, cfg.parallel.pp)  # the data-parallel degree keys the data
    dp_rank, dp_size = layout.dp_rank(session.rank), layout.dp
    pp_rank = layout.coords(session.rank)[0]
    micro = micro_batch_size(tr.global_batch_size, dp_size, tr.grad_accum_steps)

    with torch.device("meta"):  # no weights yet: the strategy shards, then materialises
        model = task.build(spec)
    flops_per_item = task.flops_per_item(model, spec)  # before sharding: ZeRO-3 leaves empty parameters behind
    parameters = sum(p.numel() for p in model.parameters())  # tied weights once; the driver tags the run with it
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    allocator = configure_cuda_allocator(cfg.cluster.cuda_alloc_conf) if session.device.type == "cuda" else None
    precision = Precision(cfg.precision.dtype, session.device, cfg.precision.fp8_emulate, cfg.precision.fp8_all_gather)
    strategy = build_strategy(cfg.strategy, precision, session.device,
                              StepSettings(micro, tr.grad_accum_steps, tr.grad_clip,
                                           (tr.activation_checkpointing, tr.ac_selective, tr.ac_every_k), tr.compile),
                              cfg.parallel)
    # fp8: the blocks' large Linear layers become torchao Float8Linear (before the strategy wraps them)
    fp8_layers = precision.prepare(model, strategy.gathers_weights)
    pretrained = getattr(tcfg.model, "init_from", None)  # a Hugging Face checkpoint (its config set the model)
    strategy.init_from = weights_file(tr.init_from or pretrained) if tr.init_from or pretrained else None
    strategy.init_from_key = f"tasks.{task_name}.{'trainer' if tr.init_from else 'model'}.init_from"
    strategy.setup(model, lambda m: build_optimizer(m, tcfg.optim))
    implementation = {"strategy": strategy.describe(), "optimizer": describe_optimizer(strategy.optimizer),
                      "precision": precision.describe(fp8_layers),
                      "activation_checkpointing": describe_activation_checkpointing(
                          tr.activation_checkpointing, tr.ac_selective, tr.ac_every_k),
                      "compile": tr.compile + (" (and the loss)" if tr.compile != "none" and tr.compile_loss else "")}
    if allocator is not None:
        implementation["cuda_allocator"] = allocator
    peak = device_peak(session.device, precision.mfu_precision, tr.peak_tflops) if flops_per_item else None
    if peak is not None:
        # logged once; tagged on the MLflow run (impl.mfu_peak*) and a metric of it (train/peak_tflops)
        implementation.update(mfu_peak=peak.describe(), mfu_peak_tflops=f"{peak.tflops:.6g}")
    if session.rank == 0:
        print(f"[{task_name}] " + "; ".join(f"{k}: {v}" for k, v in implementation.items() if k != "mfu_peak_tflops"),
              flush=True)
        # on the MLflow run now (off this thread), so a run that fails before its first checkpoint says what ran
        session.tag_run({f"impl.{k}": str(v) for k, v in implementation.items()})
        if flops_per_item and peak is None:
            print(f"[{task_name}] no MFU: the dense peak of {session.device} in {precision.mfu_precision} is not known "
                  f"(set tasks.{task_name}.trainer.peak_tflops)", flush=True)
    train_shards = ShardSet(shards_root, "train")
    train_shards.check_sizes()  # a missing, truncated or (local) corrupt shard stops the run before step 1
    reader = GlobalOrderReader(train_shards, tr.global_batch_size, dp_rank, dp_size, seed=cfg.seed,
                               window=tr.shuffle_window, prefetch=tr.prefetch_batches)
    # only the rows validation reads (it indexes the first eval_batches global batches, wrapping around)
    val = read_split(shards_root, "val", tr.eval_batches * tr.global_batch_size) if tr.eval_every else None
    ema = EMA(strategy.ema_source(), tr.ema_decay) if tr.ema_decay > 0 else None
    state, tracker = LoopState(max_steps=tr.max_steps), ValidationTracker()
    best = BestWeights(session.rank) if tr.export_weights == "best" else None
    with session.latest_checkpoint() as ckpt:
        if ckpt is not None:
            meta = read_meta(ckpt)
            _check_world(meta.get("ranks", session.world), session.world, strategy, ckpt, task_name)
            extra = strategy.load(ckpt, {"ema": ema.state_dict()} if ema is not None else {})
            if ema is not None:
                ema.load_state_dict(extra["ema"])
            reader.load_state_dict(meta["reader"])
            tracker = ValidationTracker(**meta.get("tracker", {}))
            if best is not None:
                best.restore(ckpt, meta)
            state = LoopState(meta["step"], meta["skipped_steps"], meta.get("nonfinite_in_a_row", 0),
                              meta.get("stopped_early", False), meta["history"], tr.max_steps,
                              meta.get("train_seconds", 0.0))
            if session.rank == 0:
                print(f"[{task_name}] resumed from step {state.step} ({ckpt})", flush=True)
                if meta.get("ranks", session.world) != session.world:
                    print(f"[{task_name}] resized: {meta['ranks']} -> {session.world} workers; micro-batch {micro} x "
                          f"{tr.grad_accum_steps} accumulation step(s) per worker, global batch "
                          f"{tr.global_batch_size} as before, the same samples in the same order", flush=True)
                if (before := meta.get("max_steps", tr.max_steps)) != tr.max_steps and \
                        tcfg.optim.schedule in ("cosine", "onecycle"):
                    # (the pipeline's run name keys max_steps: only a loop resumed by hand gets here)
                    print(f"[{task_name}] note: the checkpoint was written by a run of {before} steps, this one has "
                          f"{tr.max_steps}: the {tcfg.optim.schedule} schedule decays over {tr.max_steps} steps from "
                          f"here (the learning rate jumps from {lr_at(state.step - 1, tcfg.optim, before):.3g} to "
                          f"{lr_at(state.step, tcfg.optim, tr.max_steps):.3g})", flush=True)

    # the losses, norms and skips of the steps since the last report, summed on the device and
    # read once per report: a step never waits for the device (pipeline/training/window.py)
    window = StepWindow(session.device, tr.max_nonfinite_in_a_row, state.nonfinite_in_a_row)
    dropout = getattr(tcfg.model, "dropout", 0.0) > 0
    window_items, window_start, reported_final, data_wait = 0, time.perf_counter(), False, 0.0
    run_start, first_step = window_start, state.step  # for the ETA: this start's pace so far
    seconds_before = state.train_seconds  # the earlier starts' (train_seconds adds this one's)
    # validation's seconds, in this window (taken out of its throughput and MFU) and this start (for the ETA)
    val_seconds, val_total, val_count = 0.0, 0.0, 0
    while state.step < tr.max_steps and not state.stopped_early:
        lr = lr_at(state.step, tcfg.optim, tr.max_steps, tracker.plateau_scale)
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr
        gen = torch.Generator(device=session.device).manual_seed(hash((cfg.seed, state.step, dp_rank)) % (2**62))
        if dropout:
            torch.manual_seed(dropout_seed(cfg.seed, state.step, dp_rank, pp_rank))
        fetch_start = time.perf_counter()
        micros = _split(reader.next_local_batch(), tr.grad_accum_steps)
        data_wait += time.perf_counter() - fetch_start  # time the step stood still for data
        batches = [task.batch_to_tensors(micro, session.device) for micro in micros]
        step_loss = strategy.forward_backward(batches, task, gen)
        window_items += sum(task.items(batch) for batch in batches)
        norm, stepped = strategy.clip_and_step(tr.grad_clip)
        if ema is not None:
            ema.update(strategy.ema_source(), state.step, applied=stepped)  # a skipped step leaves it as it is
        state.step += 1
        window.add(step_loss, norm, stepped, state.step)

        val_loss = None
        if val is not None and state.step % tr.eval_every == 0:
            # timed from when the training queued so far has finished (validation reads its losses
            # back anyway, so this wait adds no stall), to its read back: only validation's own time
            # (with the keeping of the best weights, when it improved)
            val_start = _settled(session.device)
            local_val = validation_loss(task, strategy, val, tr.global_batch_size, tr.eval_batches, session.device,
                                        cfg.seed)
            val_loss = strategy.all_mean([local_val])[0]
            state.stopped_early = tracker.observe(val_loss, tcfg.optim, tr.early_stop_patience, state.step)
            if best is not None and tracker.best_step == state.step:  # improved: keep these weights
                best.keep(strategy, ema, state.step)
            spent = time.perf_counter() - val_start
            val_seconds, val_total, val_count = val_seconds + spent, val_total + spent, val_count + 1
        final = state.step == tr.max_steps or state.stopped_early
        do_ckpt = final or state.step % tr.ckpt_every == 0
        if not (do_ckpt or val_loss is not None or state.step % tr.log_every == 0):
            continue
        seen = window.read()  # the window's one read back from the device
        state.skipped_steps += seen.skipped
        state.nonfinite_in_a_row = seen.in_a_row
        if seen.limit_step:
            raise NonFiniteError(
                f"[{task_name}] {tr.max_nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                f"(last loss {seen.limit_loss}, grad norm {_inf_if_nan(seen.limit_norm)}) at step "
                f"{seen.limit_step}; lower optim.lr or use another precision. Checkpoints up to the last good "
                "step are kept.")
        elapsed = time.perf_counter() - window_start - val_seconds  # training's time: throughput, MFU, data wait
        loss_mean, items_total, wait_mean = strategy.all_mean([seen.loss_mean, float(window_items), data_wait])
        items_total *= dp_size  # every rank of a data-parallel replica counted the same items
        entry = {"step": state.step, "loss": loss_mean, "lr": lr, "grad_norm": seen.last_norm,
                 f"{task.item_name}_per_s": items_total / elapsed, "epoch": reader.epoch,
                 "skipped_steps": state.skipped_steps, "data_wait_frac": wait_mean / elapsed,
                 "workers": session.world,  # changes when an elastic run resumes on another count
                 "time": time.time()}  # wall clock: the MLflow timestamp of a value logged after the fit
        if val_loss is not None:
            entry["val_loss"] = val_loss
        if flops_per_item:
            entry["model_tflops"] = flops_per_item * items_total / elapsed / 1e12
            if peak is not None:  # against every device of the run (tensor/pipeline ranks too)
                faster = peak.beaten_by(entry["model_tflops"] / session.world)
                if faster.tflops != peak.tflops:
                    if session.rank == 0:
                        print(f"[{task_name}] MFU peak measured again: {faster.tflops:.4g} TFLOP/s (was "
                              f"{peak.tflops:.4g}; the CPU was busy during the first measurement)", flush=True)
                    implementation.update(mfu_peak=faster.describe(), mfu_peak_tflops=f"{faster.tflops:.6g}")
                peak = faster
                entry["mfu"] = mfu(entry["model_tflops"], peak, session.world)
        entry.update(strategy.step_metrics())  # compile_s once, under trainer.compile
        state.history.append(entry)
        session.log_step(entry)  # to the MLflow run now (rank 0, off this thread), not only after the fit
        if session.rank == 0:
            extra = f" | val {val_loss:.4f}" if val_loss is not None else ""
            util = f" | MFU {entry['mfu']:.1%}" if "mfu" in entry else ""
            later_vals = tr.max_steps // tr.eval_every - state.step // tr.eval_every if val is not None else 0
            eta = _eta(time.perf_counter() - run_start, val_total, val_count, state.step - first_step,
                       tr.max_steps - state.step, later_vals)
            grad = f"{seen.last_norm:.2f}" if math.isfinite(seen.last_norm) else "n/a"
            print(f"[{task_name}] step {state.step}/{tr.max_steps} | loss {_loss_text(loss_mean, seen)}{extra} | "
                  f"lr {lr:.2e} | grad {grad} | {entry[f'{task.item_name}_per_s']:,.0f} {task.item_name}/s{util} | "
                  f"eta {duration(eta)}", flush=True)
            if state.stopped_early:
                print(f"[{task_name}] early stop: no better validation loss than {tracker.best:.4f} in "
                      f"{tracker.evals_since_best} validations", flush=True)
            if final and best is not None:
                print(f"[{task_name}] hands on the weights of step {best.step} (validation loss "
                      f"{tracker.best:.4f}, the lowest)" if best.step is not None else
                      f"[{task_name}] no validation loss was finite: hands on the weights of the last step", flush=True)
        state.train_seconds = seconds_before + time.perf_counter() - run_start
        _report(session, strategy, ema, reader, state, tracker, entry, do_ckpt, final, implementation, parameters,
                best)
        window_items, window_start, data_wait, val_seconds = 0, time.perf_counter(), 0.0, 0.0
        reported_final = final
    if not reported_final:  # resumed a finished run: hand its final checkpoint over again
        _report(session, strategy, ema, reader, state, tracker, state.history[-1], True, True, implementation,
                parameters, best)
    reader.close()
    return state


def _settled(device: torch.device) -> float:
    """`time.perf_counter()` once the work queued on `device` has run: on a GPU the host runs
    ahead of the device, so a clock read without waiting would charge the training still queued
    to whatever is timed next. Only called where the loop reads the device back anyway."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _eta(wall: float, val_total: float, val_count: int, steps_done: int, steps_left: int, vals_left: int) -> float:
    """Seconds to the end at this start's pace: training (with its checkpoints and reports) per
    step, and validation per validation still to come. Validations are counted apart because
    they come every `eval_every` steps: spread over the steps, one just run would inflate the pace
    until the next is due, and none run yet would leave all of them out."""
    per_step = (wall - val_total) / steps_done
    per_val = val_total / val_count if val_count else 0.0  # none run yet: nothing to go by
    return per_step * steps_left + per_val * vals_left


def _loss_text(loss: float, seen: WindowValues) -> str:
    """The console's loss: a window without a finite loss says why rather than print a number
    (0.0 once, which made a diverging run look perfect)."""
    if math.isfinite(loss):
        return f"{loss:.4f}"
    if not seen.good_steps:
        return f"n/a (all {seen.skipped} steps skipped)"
    return "n/a (no finite loss on some rank)"  # this rank had good steps, another had none


def _inf_if_nan(norm: float) -> float:
    return norm if math.isfinite(norm) else float("inf")


# this rank's part of a run's previous checkpoint, by session: the estimate when a save fails
_last_part: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _report(session: Session, strategy: Strategy, ema: EMA | None, reader: GlobalOrderReader, state: LoopState,
            tracker: ValidationTracker, entry: dict[str, float], checkpoint: bool, final: bool,
            implementation: dict[str, str], parameters: int, best: BestWeights | None) -> None:
    """Report metrics; with a checkpoint every `ckpt_every` steps and at the end.

    Every rank saves its part of the strategy state into its own directory (the session merges
    them) and records its files' checksums there; rank 0 then writes the marker `meta.json`.
    The final checkpoint also holds the consolidated export weights: the EMA when enabled, those
    of the best validation under `export_weights: best` (which every checkpoint carries). A
    write that fails for want of space (in the local directory or where the session stores
    checkpoints) stops the run with `StorageFull`, naming the place and the bytes needed.
    """
    if not checkpoint:
        session.report(entry, None)
        return
    extra = {"ema": ema.state_dict()} if ema is not None else {}
    with tempfile.TemporaryDirectory(prefix="ckpt-") as d:
        local = Path(d)
        try:
            strategy.save(local, extra)
            kept = best is not None and best.step is not None  # the same on every rank
            if session.rank == 0 and kept:
                best.add_to(local, final)
            if final and not kept:  # streamed: one whole tensor at a time, written by rank 0
                write_weights(local if session.rank == 0 else None, strategy,
                              ema.weights() if ema is not None else None)
            meta = None
            if session.rank == 0:
                meta = {"step": state.step, "skipped_steps": state.skipped_steps,
                        "nonfinite_in_a_row": state.nonfinite_in_a_row, "reader": reader.state_dict(),
                        "history": state.history, "final": final, "stopped_early": state.stopped_early,
                        "tracker": tracker.state_dict(), "implementation": implementation,
                        "parameters": parameters, "best_weights_step": best.step if kept else None,
                        "max_steps": state.max_steps, "train_seconds": state.train_seconds}
                if final:  # the step whose weights the run hands on
                    meta["weights_step"] = best.step if kept else state.step
            part = seal_checkpoint(local, session.rank, session.world, meta)
        except Exception as e:
            written, before = dir_bytes(local), _last_part.get(session, 0)
            if out_of_space(e, local, before):
                raise storage_full(local.parent, state.step, max(written, before),
                                   "about " if before > written else "more than ", local=True) from e
            raise
        _last_part[session] = part
        try:
            session.report(entry, local)
        except Exception as e:
            where = getattr(session, "storage", None)
            if where is not None and out_of_space(e, where, part):
                raise storage_full(where, state.step, part) from e
            raise
