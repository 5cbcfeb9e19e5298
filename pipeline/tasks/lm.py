"""Next-token prediction on packed token rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.atomic import file_sha256
from pipeline.config.schema import GPTConfig, TaskConfig
from pipeline.models.gpt import GPT
from pipeline.tasks.base import Task, to_device


def token_cross_entropy(output: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, vocab) in fp32, whatever their dtype.

    Eagerly, the upcast makes an fp32 copy of the logits, log-softmax another, and backward two
    more of their gradient: at a 50k vocabulary these are the step's largest tensors (7.4 GB each
    for 18 x 2048 tokens). Compiled (`LanguageModeling.compile_loss`), inductor fuses the upcast
    into the reductions, and only the logits' own gradient (in their dtype) is written."""
    return F.cross_entropy(output.float().flatten(0, 1), target.flatten(), label_smoothing=smoothing)


def pretrained_source(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face checkpoint's config and generation config, after checking that the
    shards were written with its tokenizer and fit its context (errors name the fix)."""
    key = "tasks.lm.model.init_from"
    config = json.loads((folder / "config.json").read_text())
    tokenizer = folder / "tokenizer.json"
    if tokenizer.is_file() and manifest.get("tokenizer_sha256") not in (None, file_sha256(tokenizer)):
        raise ValueError(f"{key}: the shards were tokenized with another tokenizer than {tokenizer}; rerun "
                         "prepare and shard (`dvc repro` does, as init_from is one of prepare's params)")
    context = config.get("max_position_embeddings")
    if context is not None and manifest["seq_len"] > context:
        raise ValueError(f"data.seq_len ({manifest['seq_len']}) exceeds {key}'s context "
                         f"(max_position_embeddings {context})")
    generation = folder / "generation_config.json"
    return {"config": config, "generation_config": json.loads(generation.read_text()) if generation.is_file()
            else None}


class LanguageModeling(Task):
    name = "lm"
    data_kind = "text"
    item_name = "tokens"

    def model_spec(self, cfg: TaskConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        """The model's spec. A model started from a Hugging Face checkpoint (`model.init_from`)
        also carries that checkpoint's config.json and generation_config.json, so the export
        writes them back with only what training changed; its shards must have been tokenized
        by its tokenizer, and the data's sequences must fit its context."""
        multiple = cfg.model.vocab_multiple
        vocab = cfg.model.vocab_size or -(-manifest["vocab_size"] // multiple) * multiple
        if manifest["vocab_size"] > vocab:
            raise ValueError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                             f"({manifest['vocab_size']}) the shards were written with")
        spec = {"task": self.name, "model": cfg.model.model_dump(mode="json"), "vocab_size": vocab,
                "max_seq_len": manifest["seq_len"]}
        if cfg.model.init_from:
            spec["hf_source"] = pretrained_source(Path(cfg.model.init_from), manifest)
        return spec

    def build(self, spec: dict[str, Any]) -> GPT:
        return GPT(GPTConfig.model_validate(spec["model"]), spec["vocab_size"], spec["max_seq_len"])

    def batch_to_tensors(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = to_device(torch.from_numpy(batch["tokens"].astype(np.int64)), device)
        return {"x": tokens[:, :-1], "y": tokens[:, 1:]}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator | None = None) -> torch.Tensor:
        return self.output_loss(model(batch["x"]), batch["y"], self.label_smoothing if model.training else 0.0)

    def pipeline_io(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return (batch["x"],), batch["y"]

    def output_loss(self, output: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        return self._cross_entropy(output, target, smoothing)

    _cross_entropy = staticmethod(token_cross_entropy)

    def compile_loss(self, **options: Any) -> None:
        """Compile the cross-entropy for this task's runs (see `token_cross_entropy`): the training
        step, a pipeline schedule's last stage and validation all reach it through `output_loss`.
        Validation's batch shape and no-grad mode compile once more (dynamo's guards)."""
        self._cross_entropy = torch.compile(token_cross_entropy, **options)

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["y"].numel()

    def flops_per_item(self, model: nn.Module, spec: dict[str, Any]) -> float:
        return model.flops_per_token(spec["max_seq_len"])
