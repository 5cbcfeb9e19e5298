"""The MLflow model: a pyfunc that rebuilds the trained model from safetensors + spec.

Inputs and outputs are plain tables so `mlflow models serve` answers JSON:
- language model: column `prompt` (text; a cell holding a list of texts is one prompt per text, as
  MLflow hands `{"prompt": ["a", "b"]}`) -> column `completion` (params: max_new_tokens (1..MAX_NEW_TOKENS),
  min_new_tokens, temperature (below 1e-5 = greedy), top_k (0 = off), seed); at most MAX_ROWS prompts a request,
  generated PROMPTS_PER_BATCH at a time in one batch, each completion the one its prompt gets alone;
- diffusion: column `label` (class id) -> one row of C*H*W pixel values in [-1, 1] per label
  (params: steps, eta, guidance, seed; defaults: the sampler evaluation scored); at most MAX_ROWS
  labels a request, sampled IMAGES_PER_BATCH at a time; row i is the image its label alone gets with
  seed + i, whatever else the request holds (repeated labels give different images).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import mlflow.pyfunc
import numpy as np
import pandas as pd

# A request's bounds: generation is a loop of forward passes the server cannot abandon, so a request
# for 80,000 tokens (or thousands of prompts) would keep a worker busy long after the client gave up.
MAX_NEW_TOKENS = 4096  # tokens per completion
MAX_ROWS = 256  # prompts or labels per request (send more as several requests)


class PipelineModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.load(Path(context.artifacts["model_dir"]))

    def load(self, model_dir: Path, verify: bool = True) -> None:
        """The model, spec and tokenizer from `model_dir`, checked against its checksums unless its
        writer has just recorded them (`verify=False`)."""
        from pipeline.training.checkpoint import load_model

        self.dir = model_dir
        self.model, self.spec = load_model(self.dir, verify)
        self.tokenizer = None
        if self.spec["task"] == "lm":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
            # as the shard stage encodes documents (`pipeline.data.text._tokenizer`): a literal
            # `<|endoftext|>` in a prompt is text, not the end of the document it continues
            self.tokenizer.encode_special_tokens = True
            self.eos = end_of_document(self.dir, self.tokenizer)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        import torch

        from pipeline.models.generation import until_eos

        params = params or {}
        if self.spec["task"] == "lm":
            sampling = lm_params(params)
            prompts = self.prompt_ids(model_input)  # every prompt checked before any is generated
            out = []
            for first in range(0, len(prompts), PROMPTS_PER_BATCH):  # each batch one forward per token
                chunk = prompts[first : first + PROMPTS_PER_BATCH]
                # every prompt samples from its own generator seeded alike: its completion is the
                # one it gets alone, whatever else the request holds
                tokens = self.model.generate_batch(
                    chunk, sampling["max_new_tokens"], temperature=sampling["temperature"],
                    top_k=sampling["top_k"] or None, eos_id=self.eos, min_new_tokens=sampling["min_new_tokens"],
                    generators=[torch.Generator().manual_seed(sampling["seed"]) for _ in chunk],
                    vocab=self.tokenizer.get_vocab_size())  # (a padded head's extra rows: no token)
                out += [self.tokenizer.decode(until_eos(t, self.eos)) for t in tokens]
            return pd.DataFrame({"completion": out})
        from pipeline.models.diffusion import GaussianDiffusion, row_generators

        process = GaussianDiffusion(self.model.cfg.diffusion)
        sampler = diffusion_params(params, sampler_defaults(self.dir, self.spec), process.cfg.timesteps,
                                   process.cfg.cond_drop_prob)
        labels = request_labels(model_input, self.model.num_classes)
        generators = row_generators(sampler["seed"], len(labels))  # each image's own noise, as evaluation draws it
        images = torch.cat([  # a bounded batch at a time: one request, bounded memory
            process.sample(self.model, torch.from_numpy(labels[first : first + IMAGES_PER_BATCH]),
                           tuple(self.model.image_shape), self.model.num_classes, steps=sampler["steps"],
                           eta=sampler["eta"], guidance=sampler["guidance"],
                           generator=generators[first : first + IMAGES_PER_BATCH])
            for first in range(0, len(labels), IMAGES_PER_BATCH)])
        return images.flatten(1).numpy().astype(np.float32)


    def prompt_ids(self, model_input: pd.DataFrame) -> list[list[int]]:
        """The token ids of each prompt, as training saw text: its characters cleaned as the
        prepare stage cleans documents (`clean_characters`: NFC, control characters, surrogates),
        encoded with special tokens as text. An empty prompt starts from the end-of-document token,
        as every training document after the first does (token id 0 is just the first merge)."""
        from pipeline.data.cleaning import clean_characters

        out = []
        for where, prompt in request_prompts(model_input):
            ids = self.tokenizer.encode(clean_characters(prompt)[0]).ids
            if not ids:
                if self.eos is None:
                    raise ValueError(f"prompt: {where} is empty, and this model's tokenizer has no end-of-document "
                                     "token to start a document from")
                ids = [self.eos]
            out.append(ids)
        return out


def request_labels(model_input: pd.DataFrame, classes: int) -> np.ndarray:
    """The class ids of a diffusion request, as int64: a bad request is one line naming it (a
    KeyError for a missing column, an IndexError from the embedding, or the label `classes`
    silently sampling unconditionally, otherwise)."""
    if "label" not in model_input.columns:
        raise ValueError(f"label: the request has no `label` column (got columns {list(model_input.columns)})")
    labels = model_input["label"].to_numpy()
    if len(labels) == 0:
        raise ValueError("label: the request has no rows (one class id per image wanted)")
    if len(labels) > MAX_ROWS:
        raise ValueError(f"label: {len(labels)} labels, at most {MAX_ROWS} a request (send them as several requests)")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"label: class ids are integers 0..{classes - 1} (got {labels.tolist()[:10]})")
    return labels.astype(np.int64)


def request_prompts(model_input: pd.DataFrame) -> list[tuple[str, str]]:
    """(where, text) of each prompt of a request, in order. `mlflow.pyfunc`'s `predict({"prompt":
    ["a", "b"]})` hands one row whose cell is the list: each of its texts is a prompt (else the
    prompt would be the list's repr). A null or any other non-text cell is one line naming its row
    (a TypeError deep in the tokenizer, or the text "None", otherwise)."""
    if "prompt" not in model_input.columns:
        raise ValueError(f"prompt: the request has no `prompt` column (got columns {list(model_input.columns)})")
    out = []
    for row, cell in enumerate(model_input["prompt"].tolist()):
        listed = isinstance(cell, list | tuple | np.ndarray)
        for item, text in enumerate(list(cell) if listed else [cell]):
            where = f"row {row}, item {item}" if listed else f"row {row}"
            if isinstance(text, str):
                out.append((where, text))
            elif text is None or (pd.api.types.is_scalar(text) and pd.isna(text)):
                raise ValueError(f"prompt: {where} is null (one text per row wanted)")
            else:
                raise ValueError(f"prompt: {where} is a {type(text).__name__} ({str(text)[:40]!r}), not text")
    if len(out) > MAX_ROWS:
        raise ValueError(f"prompt: {len(out)} prompts, at most {MAX_ROWS} a request (send them as several requests)")
    if not out:  # as the diffusion model refuses an empty request (an empty table answered it before)
        raise ValueError("prompt: the request has no prompts (one text per row wanted; \"\" starts a document)")
    return out


def _number(params: dict[str, Any], name: str, default: float, integer: bool) -> Any:
    """A request parameter (or its default) that must be a number, or an integer: one line naming it."""
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name}: {'an integer' if integer else 'a number'} (got {value!r})")
    if integer and not float(value).is_integer():
        raise ValueError(f"{name}: an integer (got {value!r})")
    return int(value) if integer else float(value)


def _seed(params: dict[str, Any]) -> int:
    seed = _number(params, "seed", 0, True)
    if not -(1 << 63) <= seed < 1 << 64:
        raise ValueError(f"seed: a 64-bit integer (got {seed})")
    return seed


def lm_params(params: dict[str, Any]) -> dict[str, Any]:
    """The language model's sampling parameters with their defaults, each checked: a bad one is
    one line naming it (a negative or NaN temperature or top_k crashed in torch, a negative token
    count silently returned '', and nothing bounded the tokens one request may cost)."""

    def number(name: str, default: float, integer: bool) -> Any:
        return _number(params, name, default, integer)

    out = {"max_new_tokens": number("max_new_tokens", 32, True), "min_new_tokens": number("min_new_tokens", 1, True),
           "temperature": number("temperature", 0.0, False), "top_k": number("top_k", 0, True),
           "seed": _seed(params)}
    for name, least in (("max_new_tokens", 1), ("min_new_tokens", 0)):
        if not least <= out[name] <= MAX_NEW_TOKENS:
            raise ValueError(f"{name}: at least {least}, at most MAX_NEW_TOKENS {MAX_NEW_TOKENS} (got {out[name]})")
    if not (math.isfinite(out["temperature"]) and out["temperature"] >= 0):
        raise ValueError(f"temperature: a finite number, at least 0 (0 = greedy) (got {out['temperature']})")
    if out["top_k"] < 0:
        raise ValueError(f"top_k: at least 0 (0 = off) (got {out['top_k']})")
    return out


def diffusion_params(params: dict[str, Any], defaults: dict[str, Any], timesteps: int,
                     cond_drop_prob: float) -> dict[str, Any]:
    """The diffusion sampler's parameters with `defaults` (the evaluated sampler), each checked as
    the language model's are: steps an integer from 1 (more than the model's timesteps are capped
    at them), eta in [0, 1], guidance finite and at least 0 (a NaN guidance sampled as if it were 0,
    an infinite one drove the prediction to infinity), seed a 64-bit integer. A guidance asked for
    needs a model trained with labels dropped (`cond_drop_prob` > 0), as the config requires of
    evaluation: otherwise the unconditional prediction comes from an embedding never trained."""
    out = {"steps": _number(params, "steps", defaults["steps"], True),
           "eta": _number(params, "eta", defaults["eta"], False),
           "guidance": _number(params, "guidance", defaults["guidance"], False), "seed": _seed(params)}
    if out["steps"] < 1:
        raise ValueError(f"steps: at least 1, at most the model's {timesteps} diffusion timesteps used "
                         f"(got {out['steps']})")
    if not 0 <= out["eta"] <= 1:  # (NaN fails too)
        raise ValueError(f"eta: in [0, 1] (0 = deterministic DDIM, 1 = ancestral) (got {out['eta']})")
    if not (math.isfinite(out["guidance"]) and out["guidance"] >= 0):
        raise ValueError(f"guidance: a finite number, at least 0 (0 = conditional only) (got {out['guidance']})")
    if "guidance" in params and out["guidance"] > 0 and cond_drop_prob <= 0:  # (asked for: a default is what
        # evaluation scored, which an export from before this check may hold)
        raise ValueError(f"guidance: this model was trained without dropping labels (cond_drop_prob 0), so it has "
                         f"no unconditional prediction to guide with: send guidance 0 (got {out['guidance']})")
    return out


PROMPTS_PER_BATCH = 16  # prompts generated together (left-padded into one KV cache): bounds a request's memory
IMAGES_PER_BATCH = 16  # labels sampled together (twice that under guidance): bounds a request's memory
GENERATION = "generation.json"  # in the export folder: {"eos_token": ...}, from the shards' manifest
SAMPLER = "sampler.json"  # in a diffusion export folder: {"steps", "eta", "guidance"}, from the task's eval section


def sampler_settings(cfg: Any) -> dict[str, Any]:
    """What `sampler.json` holds, from the task's `eval` section (an EvalConfig)."""
    return {"steps": cfg.sample_steps, "eta": cfg.sample_eta, "guidance": cfg.guidance_scale}


def sampler_defaults(model_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The served model's sampler when a request names none: the one evaluation scored (the
    export stage records the task's eval settings in `sampler.json`), so `models:/...@champion`
    serves what was measured. A folder written before that: the sampler its spec held, else the
    eval section's defaults."""
    import json

    from pipeline.config.schema import EvalConfig
    from pipeline.config.schema.models import without_sampler

    if (model_dir / SAMPLER).is_file():
        return json.loads((model_dir / SAMPLER).read_text())
    legacy = without_sampler(spec["model"])[1]
    return sampler_settings(EvalConfig.model_validate(legacy))


def end_of_document(model_dir: Path, tokenizer: Any) -> int | None:
    """The token id a completion ends at: the end-of-document token the shards were written with
    (`generation.json`, which the export stage writes from the manifest, so a Llama-3 tokenizer's
    `<|end_of_text|>` stops as evaluation's sample does); for an export written before it, our
    `<|endoftext|>` or a Llama tokenizer's `</s>` by name."""
    import json

    names = ["<|endoftext|>", "</s>"]
    if (model_dir / GENERATION).is_file():
        names = [json.loads((model_dir / GENERATION).read_text())["eos_token"]]
    return next((i for t in names if (i := tokenizer.token_to_id(t)) is not None), None)


def example_input(spec: dict[str, Any]) -> pd.DataFrame:
    if spec["task"] == "lm":
        return pd.DataFrame({"prompt": ["The for statement", "A class is"]})
    return pd.DataFrame({"label": [0, 7]})


STAGING = "pyfunc"  # its staging folders: `.pyfunc.tmp-<writer>-<random>` beside the exporter's folder

# What the pyfunc never reads: the ONNX graphs, logged beside it under onnx/ and onnx_int8/.
NOT_IN_PYFUNC = ("model.onnx*", "model.int8.onnx*")


def pyfunc_files(record: dict[str, Any]) -> dict[str, Any]:
    """The entries of an export folder's checksum record that the MLflow model's `model_dir` holds."""
    from fnmatch import fnmatch

    return {rel: e for rel, e in record.items()
            if not any(fnmatch(rel.rsplit("/", 1)[-1], pattern) for pattern in NOT_IN_PYFUNC)}


def pyfunc_artifacts(model_dir: Path, staging: Path) -> Path:
    """The folder MLflow copies into the model as its `model_dir` artifact. MLflow names the
    artifact after the folder, and the exporter's folder is an atomic temporary one
    (`.lm.tmp-xxxx`), so the files are linked (copied where links fail) into `staging/model_dir`
    first, leaving out the ONNX files that the run already carries under onnx/. Its
    `checksums.json` is the export folder's, less those files: the served model verifies what it
    loads, and the register stage checks the logged files against it."""
    import shutil

    from pipeline.atomic import atomic_write_text, checksum_record
    from pipeline.training.checkpoint import CHECKSUMS, model_checksums

    target = staging / "model_dir"
    skip = shutil.ignore_patterns(*NOT_IN_PYFUNC)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(model_dir, target, ignore=skip, copy_function=link)
    # (a new file in place of the link: the export folder's own record stays whole)
    atomic_write_text(target / CHECKSUMS, checksum_record(pyfunc_files(model_checksums(model_dir))))
    return target


@contextlib.contextmanager
def pyfunc_staging(parent: Path) -> Iterator[Path]:
    """A fresh staging folder in `parent` for `pyfunc_artifacts` (`.pyfunc.tmp-<writer>-<random>`,
    `atomic.scratch_dir`): one left by an export killed while MLflow logged it is removed by the
    next export here once its writer is gone (a live writer's, another host's, stays)."""
    from pipeline.atomic import scratch_dir

    with scratch_dir(parent / STAGING) as staging:
        yield staging


class Logged(NamedTuple):
    info: Any  # MLflow's ModelInfo
    example_output: Any  # what this process predicts for `example_input(spec)` with the default params


def log_pyfunc(model_dir: Path, spec: dict[str, Any]) -> Logged:
    """Log the model into the active run (library code included); returns MLflow's ModelInfo and the
    prediction its signature was inferred from (which a load elsewhere must reproduce)."""
    import pipeline

    example = example_input(spec)
    output = PipelineModel()
    output.load(model_dir, verify=False)  # (the export stage has just recorded the folder)
    params = ({"max_new_tokens": 32, "min_new_tokens": 1, "temperature": 0.0, "top_k": 0, "seed": 0}
              if spec["task"] == "lm" else {**sampler_defaults(model_dir, spec), "seed": 0})
    prediction = output.predict(None, example, params)
    signature = mlflow.models.infer_signature(example, prediction, params)
    with pyfunc_staging(model_dir.parent) as staging:
        return Logged(mlflow.pyfunc.log_model(
            name="model", python_model=PipelineModel(),
            artifacts={"model_dir": str(pyfunc_artifacts(model_dir, staging))},
            code_paths=[str(Path(pipeline.__file__).parent)], signature=signature, input_example=example,
            pip_requirements=["torch", "safetensors", "tokenizers", "numpy", "pandas", "pydantic", "pyyaml"],
        ), prediction)
