"""The served language model reads a request as training read text, and refuses a bad one in one
line: prompts encoded and cleaned as the shard and prepare stages do, list cells from MLflow's
dict input expanded, sampling parameters and request size bounded; the ONNX graph records its
context; the int8 check scores the rows asked for. One tiny untrained export for the module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.text import EOS, _tokenizer, clean_characters, clean_document
from pipeline.export.pyfunc import GENERATION, MAX_NEW_TOKENS, MAX_ROWS, PipelineModel


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny GPT export folder: a byte-level BPE tokenizer trained as the prepare stage trains
    one, but with the end-of-document token at id 1, as in Hugging Face tokenizers (so id 0 is
    not it); random weights, generation.json, checksums."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pipeline.config import validate
    from pipeline.tasks import task_named
    from pipeline.training.checkpoint import write_checksums, write_model
    from tests.conftest import tiny_raw

    d = tmp_path_factory.mktemp("serving") / "lm"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[n] for n in sorted(topics)[:12]], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    t = task_named("lm")
    spec = t.model_spec(validate(tiny_raw()).task("lm"), {"vocab_size": tok.get_vocab_size(), "seq_len": 32})
    torch.manual_seed(0)
    model = t.build(spec)
    write_model(d, {k: v.clone() for k, v in model.state_dict().items()}, spec)
    tok.save(str(d / "tokenizer.json"))
    (d / GENERATION).write_text(json.dumps({"eos_token": EOS}))
    write_checksums(d)
    return d


@pytest.fixture(scope="module")
def served(lm_dir) -> PipelineModel:
    m = PipelineModel()
    m.load(lm_dir)
    return m


def complete(m: PipelineModel, prompts: list, **params) -> list[str]:
    return m.predict(None, pd.DataFrame({"prompt": prompts}), {"max_new_tokens": 6, **params})["completion"].tolist()


def test_prompts_are_encoded_and_cleaned_as_training_text(served, lm_dir):
    """A literal <|endoftext|> is text, as the shard stage encodes it (not the end-of-document
    id); CRLF, a decomposed accent and a vertical tab reach the model as the prepare stage
    cleans them, trailing blanks kept; an empty prompt starts from the end-of-document token."""
    trained = _tokenizer((lm_dir / "tokenizer.json").read_text())
    literal = "Use the <|endoftext|> marker"
    assert served.prompt_ids(pd.DataFrame({"prompt": [literal]})) == [trained.encode(literal).ids]
    assert served.eos not in trained.encode(literal).ids
    for raw, clean in [("def f():\r\n    return 1\r\n", "def f():\n    return 1\n"), ("Cafe\u0301 ", "Caf\u00e9 "),
                       ("tab\x0bhere", "tab\nhere"), ("half \ud83d emoji", "half  emoji")]:
        assert clean_characters(raw)[0] == clean
        cell = pd.Series([raw], dtype=object)  # (an Arrow string column cannot hold the surrogate)
        assert served.prompt_ids(pd.DataFrame({"prompt": cell})) == [trained.encode(clean).ids]
    assert clean_document(" a \r\nb \r\n\r\n") == (" a\nb", 0)  # the document cleaning is unchanged
    assert served.prompt_ids(pd.DataFrame({"prompt": [""]})) == [[served.eos]] and served.eos != 0


def test_list_cells_are_one_prompt_each_through_mlflow(served, lm_dir, tmp_path_factory, monkeypatch):
    """`mlflow.pyfunc.load_model(uri).predict({"prompt": ["a", "b"]})` gives one completion per
    prompt, in order, the same as a two-row frame (it gave one, for the prompt "['a', 'b']")."""
    import mlflow

    from pipeline.config.schema import TrackingConfig
    from pipeline.export.pyfunc import log_pyfunc
    from pipeline.tracking import mlflow_runs

    root = tmp_path_factory.mktemp("mlflow")
    monkeypatch.chdir(root)
    mlflow_runs.setup(TrackingConfig(uri=f"sqlite:///{root}/mlruns.db", artifact_dir=str(root / "art")))
    try:
        with mlflow.start_run():
            info, _ = log_pyfunc(lm_dir, served.spec)
        model = mlflow.pyfunc.load_model(info.model_uri)
        prompts = ["The for statement", "A class is", "x"]
        frame = model.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 5})
        listed = model.predict({"prompt": prompts}, params={"max_new_tokens": 5})
    finally:
        mlflow.set_tracking_uri(None)
    assert listed["completion"].tolist() == frame["completion"].tolist() == complete(served, prompts, max_new_tokens=5)
    assert len(listed) == 3


@pytest.mark.parametrize(("prompts", "params", "message"), [
    (["a"], {"temperature": -1.0}, r"^temperature: a finite number, at least 0 .*\(got -1\.0\)$"),
    (["a"], {"temperature": float("nan")}, r"^temperature: .*\(got nan\)$"),
    (["a"], {"temperature": float("inf")}, r"^temperature: .*\(got inf\)$"),
    (["a"], {"top_k": -1}, r"^top_k: at least 0 \(0 = off\) \(got -1\)$"),
    (["a"], {"max_new_tokens": -5}, r"^max_new_tokens: at least 1, at most MAX_NEW_TOKENS 4096 \(got -5\)$"),
    (["a"], {"max_new_tokens": 80_000}, r"^max_new_tokens: at least 1, at most MAX_NEW_TOKENS 4096 \(got 80000\)$"),
    (["a"], {"min_new_tokens": -1}, r"^min_new_tokens: at least 0"),
    (["a"], {"max_new_tokens": 2.5}, r"^max_new_tokens: an integer \(got 2\.5\)$"),
    (["a"], {"seed": "x"}, r"^seed: an integer \(got 'x'\)$"),
    (["a", None], {}, r"^prompt: row 1 is null \(one text per row wanted\)$"),
    (["a", float("nan")], {}, r"^prompt: row 1 is null"),
    ([3], {}, r"^prompt: row 0 is a int \('3'\), not text$"),
    ([["a", None]], {}, r"^prompt: row 0, item 1 is null"),
    (["a"] * (MAX_ROWS + 1), {}, rf"^prompt: {MAX_ROWS + 1} prompts, at most {MAX_ROWS} a request"),
    ([], {}, r"^prompt: the request has no prompts"),
    ([[]], {}, r"^prompt: the request has no prompts"),
    (["a"], {"seed": 2**70}, r"^seed: a 64-bit integer \(got 1180591620717411303424\)$"),
])
def test_bad_requests_are_one_line(served, prompts, params, message):
    frame = pd.DataFrame({"prompt": pd.Series(prompts, dtype=object)})
    with pytest.raises(ValueError, match=message) as e:
        served.predict(None, frame, params)
    assert "\n" not in str(e.value)


def test_good_edges_still_generate(served):
    """The bounds themselves are requests: greedy and sampled, top_k 0, a list cell among plain
    rows, and the same prompt gives the same completion alone or among others."""
    assert MAX_NEW_TOKENS == 4096
    alone = complete(served, ["The for statement"], temperature=0.7, top_k=0, seed=3, min_new_tokens=0)
    mixed = served.predict(None, pd.DataFrame({"prompt": pd.Series([["x", "The for statement"], "y"], dtype=object)}),
                           {"max_new_tokens": 6, "temperature": 0.7, "seed": 3, "min_new_tokens": 0})
    assert len(mixed) == 3 and mixed["completion"][1] == alone[0]
    assert complete(served, ["a"] * 2, max_new_tokens=1) == complete(served, ["a"], max_new_tokens=1) * 2


@pytest.mark.parametrize("temperature", [1e-39, 5e-324])
def test_a_tiny_temperature_is_greedy(served, temperature):
    """A positive temperature too small to divide the logits by (they overflowed to inf, and
    torch.multinomial crashed) samples greedily, as 0 does: in the batched loop and, for a prompt
    whose continuation outgrows the context, in the sliding one."""
    prompts = ["The for statement", "x " * 40]
    assert complete(served, prompts, temperature=temperature, seed=1) == complete(served, prompts, temperature=0.0)


@pytest.mark.parametrize("tied", [True, False])
def test_int8_keeps_one_outlier_embedding_row_from_coarsening_the_logits(served, tmp_path, tied):
    """onnxruntime quantized the embedding's Gather with one scale for the whole table: one large
    row (x30 here) coarsened every token's embedding, and through a tied head every logit. The
    table stays fp32; an untied head is quantized with one scale per vocabulary entry."""
    import onnx

    from pipeline.config import validate
    from pipeline.export.onnx_export import export_onnx
    from pipeline.export.quantize import OnnxLM, quantize_int8
    from pipeline.tasks import task_named
    from tests.conftest import tiny_raw

    t = task_named("lm")
    spec = t.model_spec(validate(tiny_raw([f"tasks.lm.model.tie_weights={str(tied).lower()}"])).task("lm"),
                        {"vocab_size": served.spec["vocab_size"], "seq_len": 32})
    torch.manual_seed(0)
    model = t.build(spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.embed.weight[5] *= 30
    export_onnx(model, spec, tmp_path / "m.onnx")
    quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx")
    graph = onnx.load(str(tmp_path / "m.int8.onnx")).graph
    # no int8 table read back through one scale: neither the embedding nor a tied head
    assert not [n.name for n in graph.node
                if n.op_type in ("Gather", "DequantizeLinear") and n.input[0].endswith("_quantized")]
    head = [n for n in graph.node if n.op_type == "MatMulInteger"][-1]
    scales = {i.name: list(i.dims) for i in graph.initializer}
    if not tied:  # (a tied head reads the fp32 table through a Transpose, which stays fp32)
        assert scales[head.input[1].removesuffix("_quantized") + "_scale"] == [spec["vocab_size"]]
    tokens = torch.randint(6, spec["vocab_size"], (4, 32))  # (not the outlier)
    diff = (OnnxLM(tmp_path / "m.onnx")(tokens) - OnnxLM(tmp_path / "m.int8.onnx")(tokens)).abs()
    # with one table scale: 0.27 (tied) and 0.19 (untied) on the other tokens' logits, 3.4 on the tied outlier's
    assert torch.cat([diff[..., :5], diff[..., 6:]], -1).max() < 0.05 and diff.max() < 1.0


def test_onnx_graph_records_its_context_and_names_a_longer_sequence(served, lm_dir, tmp_path):
    """The graph's metadata_props hold max_seq_len, vocab_size and the end-of-document id (from
    the export folder's tokenizer), the int8 graph keeps them, and a sequence longer than the
    context is one line naming it, not onnxruntime's broadcast error."""
    import shutil

    import onnxruntime as ort

    from pipeline.export.onnx_export import check_context, export_onnx
    from pipeline.export.quantize import quantize_int8

    for name in ("tokenizer.json", GENERATION):
        shutil.copy2(lm_dir / name, tmp_path / name)
    assert export_onnx(served.model.eval(), served.spec, tmp_path / "model.onnx") < 1e-4
    quantize_int8(tmp_path / "model.onnx", tmp_path / "model.int8.onnx")
    want = {"max_seq_len": "32", "vocab_size": str(served.spec["vocab_size"]), "eos_token_id": str(served.eos)}
    for graph in ("model.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(tmp_path / graph), providers=["CPUExecutionProvider"])
        assert want.items() <= session.get_modelmeta().custom_metadata_map.items()
        check_context(session, np.zeros((1, 32), dtype=np.int64))
        with pytest.raises(ValueError, match=r"^tokens: a sequence of 33 tokens is longer than the model's context "
                                             r"\(max_seq_len 32\)"):
            check_context(session, np.zeros((1, 33), dtype=np.int64))


@pytest.mark.parametrize("rows", [1, 16, 17, 20, 37, 100])
def test_int8_check_scores_exactly_the_rows_asked_for(rows, built_data, monkeypatch, tmp_path):
    """The int8 check's `rows` validation rows, in batches of 16 and a last one of what is left:
    20 rows are 16 + 4 (not 32 rows, nor 20 batches of 1), a prime count is not scored one row
    at a time. Each graph sees the same rows (here a stand-in for the ONNX sessions)."""
    from pipeline.data.shard_store import read_split
    from pipeline.export import quantize

    batches: dict[str, list[torch.Tensor]] = {}

    class Graph(torch.nn.Module):
        def __init__(self, path):
            super().__init__()
            self.name = str(path)
            batches[self.name] = []

        def forward(self, tokens):
            batches[self.name].append(tokens)
            return torch.zeros(*tokens.shape, 300)

    monkeypatch.setattr(quantize, "OnnxLM", Graph)
    monkeypatch.setattr(quantize, "check_context", lambda *a: None)
    shards = built_data[1]["lm"]
    for name, size in (("a.onnx", 4), ("b.onnx", 1)):
        (tmp_path / name).write_bytes(b"x" * size)
    report = quantize.accuracy_change(tmp_path / "a.onnx", tmp_path / "b.onnx", shards, rows)
    assert report["int8_size_ratio"] == 0.25
    batches = {Path(k).name: v for k, v in batches.items()}
    available = len(read_split(shards, "val")["tokens"])
    want = min(rows, available)
    assert available >= 37  # (so the prime counts are scored in full)
    for name in ("a.onnx", "b.onnx"):
        sizes = [len(t) for t in batches[name][:-1]]  # (the last call is the one-row logit probe)
        assert sum(sizes) == want and all(n == 16 for n in sizes[:-1]) and 0 < sizes[-1] <= 16, (name, sizes)
    torch.testing.assert_close(torch.cat(batches["a.onnx"][:-1]), torch.cat(batches["b.onnx"][:-1]))


def test_a_request_of_many_prompts_is_batched_and_each_completion_is_its_own(served, monkeypatch):
    """More prompts than one batch holds, of many lengths (one empty): generated
    PROMPTS_PER_BATCH at a time, each batch one cached forward per token, and each completion the
    one its prompt gets alone, greedy and sampled (every prompt its own generator, seeded alike)."""
    from pipeline.export import pyfunc
    from pipeline.models.gpt import GPT

    monkeypatch.setattr(pyfunc, "PROMPTS_PER_BATCH", 4)
    text = "The for statement iterates over the items of any sequence in the order that they appear"
    prompts = [" ".join(text.split(" ")[: n % 9]) for n in range(10)]  # 10 prompts: batches of 4, 4, 2
    rows = []
    cached = GPT.forward_cached
    monkeypatch.setattr(GPT, "forward_cached", lambda self, idx, cache: rows.append(idx.shape[0]) or
                        cached(self, idx, cache))
    for params in ({}, {"temperature": 0.8, "top_k": 20, "seed": 5}):
        rows.clear()
        together = complete(served, prompts, min_new_tokens=6, **params)
        assert rows[0] == 4 and set(rows) <= {4, 2} and rows.count(2) * 3 == len(rows)  # 4, 4, 2 rows a step
        alone = [complete(served, [p], min_new_tokens=6, **params)[0] for p in prompts]
        assert together == alone and len(set(together)) > 1, params


def test_pipeline_generate_completes_prompts_from_the_command_line(served, lm_dir, capsys, monkeypatch):
    """`pipeline generate PROMPT... --model <export folder>`: each prompt followed by the completion
    the served model gives it; prompts from stdin with '-'; a bad parameter, a folder without a
    model, a store that does not exist (not created by asking) and a registered name or alias it
    does not hold are one line each (exit 2)."""
    import io

    from pipeline.cli import main

    prompts = ["The for statement", "A class is"]
    want = complete(served, prompts, max_new_tokens=5)
    main(["generate", *prompts, "--model", str(lm_dir), "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert out == "".join(f"--- {p!r}\n{p}{c}\n" for p, c in zip(prompts, want, strict=True))
    monkeypatch.setattr("sys.stdin", io.StringIO("The for statement\n"))
    main(["generate", "-", "--model", str(lm_dir), "--max-new-tokens", "5"])
    assert capsys.readouterr().out == f"The for statement{want[0]}\n"
    import mlflow

    store = lm_dir.parent / "store.db"
    mlflow.MlflowClient(f"sqlite:///{store}").create_registered_model("pipeline-lm")  # a store, no versions
    capsys.readouterr()  # (MLflow's lines about making the store)
    missing = lm_dir.parent / "missing.db"
    for args, message in ((["--temperature", "-1"], "error: temperature: a finite number, at least 0"),
                          (["--model", str(lm_dir.parent)], "no exported model here (model_spec.json)"),
                          (["--model", "models:/pipeline-lm@champion", "--tracking-uri", f"sqlite:///{missing}"],
                           f"error: no tracking store at sqlite:///{missing}: nothing has been registered here yet"),
                          (["--model", "models:/pipeline-lm@champion", "--tracking-uri", f"sqlite:///{store}"],
                           "error: 'pipeline-lm@champion': no such registered model version"),
                          (["--model", "models:/nope/3", "--tracking-uri", f"sqlite:///{store}"],
                           "error: 'nope/3': no such registered model version")):
        with pytest.raises(SystemExit) as done:
            main(["generate", "x", "--model", str(lm_dir), *args])
        err = capsys.readouterr().err
        assert done.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not missing.exists()
