"""The MLflow model: a pyfunc that rebuilds the trained model from safetensors + spec.

Inputs and outputs are plain tables so `mlflow models serve` answers JSON:
- language model: column `prompt` (text) -> column `completion` (params: max_new_tokens, temperature
  (0 = greedy), top_k (0 = off), seed);
- diffusion: column `label` (class id) -> one row of C*H*W pixel values in [-1, 1] per label.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd


class PipelineModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from pipeline.training.checkpoint import load_model

        self.dir = Path(context.artifacts["model_dir"])
        self.model, self.spec = load_model(self.dir)
        self.tokenizer = None
        if self.spec["task"] == "lm":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
            # a completion ends with its document: our <|endoftext|> (pipeline.data.text.EOS, not imported:
            # the served model's requirements have no pyarrow), or a Llama tokenizer's </s>
            self.eos = next((i for t in ("<|endoftext|>", "</s>") if (i := self.tokenizer.token_to_id(t)) is not None),
                            None)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        import torch

        from pipeline.models.gpt import until_eos

        params = params or {}
        if self.spec["task"] == "lm":
            out = []
            for prompt in model_input["prompt"].astype(str):
                ids = torch.tensor([self.tokenizer.encode(prompt).ids or [0]])
                top_k = int(params.get("top_k", 0)) or None
                gen = self.model.generate(ids, int(params.get("max_new_tokens", 32)),
                                          temperature=float(params.get("temperature", 0.0)), top_k=top_k,
                                          generator=torch.Generator().manual_seed(int(params.get("seed", 0))),
                                          eos_id=self.eos, min_new_tokens=int(params.get("min_new_tokens", 1)))
                out.append(self.tokenizer.decode(until_eos(gen[0, ids.shape[1] :].tolist(), self.eos)))
            return pd.DataFrame({"completion": out})
        from pipeline.models.diffusion import GaussianDiffusion

        labels = torch.tensor(model_input["label"].to_numpy(), dtype=torch.long)
        process = GaussianDiffusion(self.model.cfg.diffusion)
        images = process.sample(self.model, labels, tuple(self.model.image_shape), self.model.num_classes,
                                steps=int(params.get("steps", 25)),
                                generator=torch.Generator().manual_seed(int(params.get("seed", 0))))
        return images.flatten(1).numpy().astype(np.float32)


def example_input(spec: dict[str, Any]) -> pd.DataFrame:
    if spec["task"] == "lm":
        return pd.DataFrame({"prompt": ["The for statement", "A class is"]})
    return pd.DataFrame({"label": [0, 7]})


STAGING = "pyfunc"  # its staging folders: `.pyfunc.tmp-<writer>-<random>` beside the exporter's folder

# What the pyfunc never reads: the ONNX graphs, logged beside it under onnx/ and onnx_int8/.
NOT_IN_PYFUNC = ("model.onnx*", "model.int8.onnx*")


def pyfunc_artifacts(model_dir: Path, staging: Path) -> Path:
    """The folder MLflow copies into the model as its `model_dir` artifact. MLflow names the
    artifact after the folder, and the exporter's folder is an atomic temporary one
    (`.lm.tmp-xxxx`), so the files are linked (copied where links fail) into `staging/model_dir`
    first, leaving out the ONNX files that the run already carries under onnx/."""
    import shutil

    target = staging / "model_dir"
    skip = shutil.ignore_patterns(*NOT_IN_PYFUNC)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(model_dir, target, ignore=skip, copy_function=link)
    return target


@contextlib.contextmanager
def pyfunc_staging(parent: Path) -> Iterator[Path]:
    """A fresh staging folder in `parent` for `pyfunc_artifacts` (`.pyfunc.tmp-<writer>-<random>`,
    `atomic.scratch_dir`): one left by an export killed while MLflow logged it is removed by the
    next export here once its writer is gone (a live writer's, another host's, stays)."""
    from pipeline.atomic import scratch_dir

    with scratch_dir(parent / STAGING) as staging:
        yield staging


def log_pyfunc(model_dir: Path, spec: dict[str, Any]):
    """Log the model into the active run (library code included); returns MLflow's ModelInfo."""
    import pipeline

    example = example_input(spec)
    params = ({"max_new_tokens": 32, "min_new_tokens": 1, "temperature": 0.0, "top_k": 0, "seed": 0}
              if spec["task"] == "lm" else {"steps": 25, "seed": 0})
    output = PipelineModel()
    output.load_context(type("Ctx", (), {"artifacts": {"model_dir": str(model_dir)}})())
    signature = mlflow.models.infer_signature(example, output.predict(None, example, params), params)
    with pyfunc_staging(model_dir.parent) as staging:
        return mlflow.pyfunc.log_model(
            name="model", python_model=PipelineModel(),
            artifacts={"model_dir": str(pyfunc_artifacts(model_dir, staging))},
            code_paths=[str(Path(pipeline.__file__).parent)], signature=signature, input_example=example,
            pip_requirements=["torch", "safetensors", "tokenizers", "numpy", "pandas", "pydantic", "pyyaml"],
        )
