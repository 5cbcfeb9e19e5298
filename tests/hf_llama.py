"""The tiny Llama the Hugging Face tests start from (a real `transformers` model saved here, no hub
access), the pipeline config that fine-tunes it, its data prepared and sharded with its tokenizer,
and our GPT loaded from its weights: shared by the import and export tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import validate


@pytest.fixture(scope="module")
def llama(tmp_path_factory, text_corpus) -> Path:
    """Untied, grouped-query (4 heads, 2 kv), embedding rows padded beyond the tokenizer's."""
    from tests.conftest import make_tiny_llama  # (here: conftest imports these fixtures)

    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "llama", text_corpus, pad_vocab=5)


def llama_cfg(llama: Path, text_corpus: Path, *extra: str):
    """The tiny config fine-tuning `llama` on `text_corpus`."""
    from tests.conftest import tiny_raw

    return validate(tiny_raw([f"tasks.lm.data.source={text_corpus}", f"tasks.lm.model.init_from={llama}", *extra]))


@pytest.fixture(scope="module")
def llama_data(tmp_path_factory, llama, text_corpus):
    """Prepare and shard the corpus with the Llama's tokenizer (what `dvc repro` does)."""
    from pipeline.data.build import prepare, shard

    cfg = llama_cfg(llama, text_corpus)
    root = tmp_path_factory.mktemp("llama_data")
    stats = prepare(cfg.task("lm").data, cfg.seed, root / "prepared", tokenizer_from=llama)
    shard(cfg.task("lm").data, root / "prepared", root / "shards")
    return cfg, stats, root / "shards"


def load_weights(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """`model` with the weights of `folder` (read by name, as the loader reads them), in eval mode."""
    from pipeline.distributed.sharded_init import copy_from_safetensors, parameter_names

    names = parameter_names(model)
    copy_from_safetensors(folder, {names[id(p)]: p for p in model.parameters()})
    return model.eval()
