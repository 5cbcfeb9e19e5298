"""Language-model evaluation: loss and perplexity on held-out splits, and a text sample."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config.schema import EvalConfig
from pipeline.data.shard_format import load_manifest
from pipeline.data.shard_store import read_split
from pipeline.data.shard_tokenizer import load_tokenizer
from pipeline.data.text import EOS
from pipeline.evaluation.device import model_device
from pipeline.models.generation import until_eos


def perplexity(loss: float) -> float:
    """exp(loss); infinite for a loss too large to exponentiate (damaged or diverged weights)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def split_loss(model: torch.nn.Module, shards: Path, split: str, cfg: EvalConfig, rows: int | None = None) -> float:
    """Mean next-token cross-entropy over the first `rows` rows of a split (by default
    max_batches * batch_size; fewer where the split has fewer), in batches of batch_size, the
    last one what is left."""
    tokens = read_split(shards, split, cfg.max_batches * cfg.batch_size if rows is None else rows)["tokens"]
    tokens = tokens.astype(np.int64)
    total, count = 0.0, 0
    device = model_device(model)
    for i in range(0, len(tokens), cfg.batch_size):
        t = torch.from_numpy(tokens[i : i + cfg.batch_size]).to(device)
        logits = model(t[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten(), reduction="sum").item()
        count += t[:, 1:].numel()
    return total / count


def evaluate_lm(model: torch.nn.Module, shards: Path, cfg: EvalConfig, prompt: str = "The ") -> tuple[dict, str]:
    metrics = {}
    for split in ("val", "test"):
        loss = split_loss(model, shards, split, cfg)
        metrics[f"{split}_loss"] = loss
        metrics[f"{split}_perplexity"] = perplexity(loss)
    tok = load_tokenizer(shards)  # the one the shards were written with, or an error naming the file
    ids = torch.tensor([tok.encode(prompt).ids], device=model_device(model))
    # the sample ends with its document, not glued to the next one
    eos = tok.token_to_id(load_manifest(shards).get("eos_token", EOS))
    out = model.generate(ids, 120, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0), eos_id=eos,
                         vocab=tok.get_vocab_size())
    return metrics, tok.decode(until_eos(out[0].tolist(), eos))
