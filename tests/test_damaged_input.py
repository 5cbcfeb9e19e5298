"""Damaged input (issue 21): text in another encoding, binary files, a corpus that de-duplication
empties, a corrupt shard manifest and a bad compose override each get a counted, named,
one-line answer instead of silent damage or a traceback."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import ConfigError, compose
from pipeline.config.schema import SplitConfig, TextDataConfig
from pipeline.data.build import prepare
from pipeline.data.shard_format import ShardError, load_manifest
from pipeline.data.shard_store import ShardSet
from pipeline.data.shard_writer import write_dataset
from pipeline.data.sources import (
    SNIFF_BYTES,
    DataSourceError,
    Decoding,
    RefusedFile,
    decode_lines,
    read_text_documents,
)
from pipeline.data.splits import assign_split, content_hash

ROOT = Path(__file__).resolve().parents[1]
FRENCH = ["Le café de la gare numéro {i} est fermé à cause de la grève; les élèves attendent près du kiosque.",
          "À Noël, l'hôtel {i} prépare une bûche glacée et des crêpes flambées pour les enfants émerveillés."]


def _docs(n: int = 20) -> list[str]:
    return [t.format(i=i) for i in range(n) for t in FRENCH]


def _kept(out: Path) -> list[str]:
    return [d for s in ("train", "val", "test") for d in pq.read_table(out / f"{s}.parquet")["text"].to_pylist()]


def _cfg(source: Path, **kw) -> TextDataConfig:
    return TextDataConfig(source=str(source), min_chars=10, vocab_size=300, **kw)


def test_damaged_latin1_file_is_re_decoded_and_counted(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/latin1.txt").write_bytes("\n\n".join(_docs()).encode("latin-1"))
    (tmp_path / "src/utf8.md").write_text("\n\n".join(d.upper() for d in _docs(5)), encoding="utf-8")
    (tmp_path / "src/rows.jsonl").write_bytes("\n".join(json.dumps({"text": f"Ligne {i}: déjà vu, très coûteux."},
                                                                   ensure_ascii=False) for i in range(5))
                                              .encode("cp1252"))
    stats = prepare(_cfg(tmp_path / "src"), 1, tmp_path / "out")
    kept = _kept(tmp_path / "out")
    assert not any("\ufffd" in d for d in kept)
    assert set(_docs()) <= set(kept) and "Ligne 3: déjà vu, très coûteux." in kept
    assert stats["files_read"] == 3 and stats["files_redecoded"] == 2
    assert stats["files_repaired"] == stats["files_refused"] == 0
    assert stats["redecoded_files"] == [f"{tmp_path}/src/latin1.txt (cp1252)", f"{tmp_path}/src/rows.jsonl (cp1252)"]
    assert stats["documents_raw"] == 40 + 10 + 5


def test_damaged_utf8_with_stray_bytes_is_repaired_and_counted(tmp_path):
    """A UTF-8 file with a few cp1252 bytes pasted in (“smart quotes”) keeps its UTF-8 and gets
    the stray bytes read as cp1252, counted; so does a stray byte past the first MiB."""
    body = "\n\n".join(_docs()).encode("utf-8") + b"\n\nHe said \x93enough\x94 and left the caf\xe9 early."
    (tmp_path / "mixed.txt").write_bytes(body)
    stats = prepare(_cfg(tmp_path / "mixed.txt"), 1, tmp_path / "out")
    kept = _kept(tmp_path / "out")
    assert "He said “enough” and left the café early." in kept and set(_docs()) <= set(kept)
    assert stats["files_repaired"] == 1 and stats["bytes_repaired"] == 3 and stats["files_redecoded"] == 0
    assert stats["repaired_files"] == [f"{tmp_path}/mixed.txt (3 bytes read as cp1252)"]

    # Past the sniffed first MiB, across a chunk boundary and a \r\n split in two.
    big = ("naïve " * 1000 + "\n").encode() * (SNIFF_BYTES // 7000 + 2)
    decoding = Decoding()
    lines = list(decode_lines(io.BytesIO(big + b"end caf\xe9\r\nlast"), "big.txt", "auto", decoding))
    assert lines[-2:] == ["end café", "last"] and len(lines) == SNIFF_BYTES // 7000 + 4
    assert (decoding.status, decoding.repaired_bytes) == ("repaired", 1)


def test_damaged_binary_file_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/good.txt").write_text("\n\n".join(_docs()), encoding="utf-8")
    junk = tmp_path / "src/junk.txt"
    junk.write_bytes(np.random.default_rng(0).bytes(200_000))
    with pytest.raises(RefusedFile, match=re.escape(f"{junk}: a binary file (NUL bytes)")):
        list(read_text_documents(str(junk)))
    stats = prepare(_cfg(tmp_path / "src"), 1, tmp_path / "out")  # one stray binary file: skipped, counted
    assert stats["files_read"] == 1 and stats["files_refused"] == 1 and stats["documents_raw"] == 40
    assert stats["refused_files"] == [f"{junk} (a binary file (NUL bytes), not text)"]
    assert f"warning: prepare skipped {junk}: a binary file" in capsys.readouterr().err
    assert sorted(_kept(tmp_path / "out")) == sorted(_docs())

    # Bytes with no NUL that fit no encoding are refused too; a source of nothing else is an error naming them.
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(b or 1 for b in np.random.default_rng(1).bytes(4000)))
    with pytest.raises(ValueError) as err:
        prepare(_cfg(noise), 1, tmp_path / "out2")
    assert str(err.value).startswith("no training documents left: read 0 documents from 0 of 1 files")
    assert str(err.value).endswith(f"refused 1 files that are not text: {noise} (not text (not UTF-8, and no "
                                   "encoding fits); set data.encoding if it is text)")


def test_damaged_declared_encoding_is_strict_and_named(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("\n\n".join(_docs()).encode("latin-1"))
    with pytest.raises(DataSourceError, match=re.escape(f"{latin}: not valid utf-8 at byte 6 (invalid continuation")):
        prepare(_cfg(latin, encoding="utf-8"), 1, tmp_path / "out")
    stats = prepare(_cfg(latin, encoding="latin-1"), 1, tmp_path / "out")
    assert set(_docs()) <= set(_kept(tmp_path / "out"))
    assert stats["files_redecoded"] == stats["files_repaired"] == 0  # the encoding was declared, not guessed
    with pytest.raises(ValueError, match="not a text encoding"):
        TextDataConfig(encoding="base64")


def test_damaged_all_duplicates_says_which_rule_dropped_them(tmp_path):
    """300 copies of one paragraph that lands in val or test: the error says 299 were duplicates."""
    para = next(p for i in range(100) if assign_split(content_hash((
        p := f"One paragraph, copied over and over again, number {i}.").encode()), SplitConfig()) != "train")
    (tmp_path / "copies.txt").write_text("\n\n".join([para] * 300 + ["tiny"]))
    with pytest.raises(ValueError) as err:
        prepare(_cfg(tmp_path / "copies.txt"), 1, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("no training documents left: read 301 documents from 1 of 1 files")
    assert "dropped 1 too short (data.min_chars), 299 exact duplicates, 0 near-duplicates" in msg
    assert "1 held out for val/test (data.split)" in msg


def test_damaged_manifest_json_is_named(tmp_path):
    root = tmp_path / "shards"
    write_dataset(root, {"train": [{"x": np.arange(10)}]}, 4, {"kind": "test"})
    assert load_manifest(root)["splits"]["train"]["rows"] == 10
    manifest = root / "manifest.json"
    manifest.write_text('{"kind\t": 1}')
    with pytest.raises(ShardError) as err:
        load_manifest(root)
    assert str(err.value) == (f"{manifest} is corrupt (Invalid control character at: line 1 column 7 (char 6)): "
                              "run the shard stage again")
    with pytest.raises(ShardError, match=re.escape(f"{manifest} is corrupt")):
        ShardSet(root, "train")  # what the reader and the train stage call
    manifest.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ShardError, match=re.escape(f"{manifest} is corrupt (not UTF-8 text at byte 0)")):
        load_manifest(root)
    manifest.write_text("[1, 2]")
    with pytest.raises(ShardError, match=re.escape(f"{manifest} is not a shard manifest")):
        load_manifest(root)


def test_damaged_compose_override_is_one_line(tmp_path):
    out = tmp_path / "params.yaml"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "compose", "--config-dir", str(ROOT / "configs"),
                           "--out", str(out), "model@tasks.lm.model=nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not out.exists(), proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: model@tasks.lm.model=nope: no config 'nope' in group 'model' (options: dit_small, dit_tiny, "
        "gpt_125m, gpt_1b, gpt_350m, gpt_7b, gpt_small, gpt_tiny, unet_small, unet_tiny)"]
    for override, expected in [("tasks.lm.nokey=3", "tasks.lm.nokey: unknown key"),
                               ("~tasks.lm.nokey", "Could not delete from config. 'tasks.lm.nokey' does not exist."),
                               ("tasks.lm.data.min_chars", "override 'tasks.lm.data.min_chars': missing EQUAL"),
                               ("model=gpt_tiny", "Did you mean to override one of model@tasks.diffusion.model"),
                               ("tasks.lm.data.min_chars=${nope}", "tasks.lm.data.min_chars: Interpolation key 'nope' "
                                                                   "not found"),
                               ("tasks.lm.data.source=~/corpus", "override 'tasks.lm.data.source=~/corpus': cannot "
                                "read '~' at position 22 (quote a value holding it: "
                                "\"tasks.lm.data.source='~/corpus'\")"),
                               ("model@tasks.lm.model=_gpt_base", "model@tasks.lm.model=_gpt_base: '_gpt_base' is a "
                                "base the 'model' presets share, not one of them (options: dit_small, ")]:
        with pytest.raises(ConfigError) as err:
            compose(ROOT / "configs", [override])
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match=r"no config\.yaml in"):
        compose(tmp_path, [])


@pytest.mark.parametrize("base", ["model@tasks.lm.model=_gpt_base", "model@tasks.diffusion.model=_dit_base",
                                  "model@tasks.diffusion.model=_unet_base"])
def test_damaged_model_base_picked_through_dvc_is_refused(tmp_path, base):
    """`dvc exp run -S 'model@tasks.lm.model=_gpt_base'` composes with DVC's own Hydra call, which
    `pipeline compose`'s refusal never sees: params.yaml held the base's placeholder sizes labelled
    `custom`, and the train stage trained them. The base names itself, and the config refuses it."""
    from dvc.utils.hydra import compose_and_dump

    from pipeline.config import load_config

    compose_and_dump(tmp_path / "params.yaml", str(ROOT / "configs"), None, "config", str(tmp_path), [base])
    key = base.split("=")[0].split("@")[1]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}\.preset: .*'_\w+_base' is the base the model presets "
                                          r"share, not a preset"):
        load_config(tmp_path / "params.yaml")


def test_damaged_compose_out_is_a_file_written_through_its_link(tmp_path):
    """`--out` naming a folder was a traceback, a link was replaced by a file (its target left as it
    was), and a device such as /dev/stdout became a regular file when run as root; `-` prints."""
    def run(out: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "compose", "--config-dir", str(ROOT / "configs"),
                               "--out", out], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    folder = tmp_path / "folder"
    folder.mkdir()
    proc = run(str(folder))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --out {folder}: is a folder; name the file to write (e.g. {folder / 'params.yaml'})"], proc.stderr
    target, link = tmp_path / "target.yaml", tmp_path / "link.yaml"
    target.write_text("")
    link.symlink_to(target)
    assert run(str(link)).returncode == 0
    assert link.is_symlink() and yaml.safe_load(target.read_text())["tasks"]["lm"]["model"]["kind"] == "gpt"
    printed = run("-")
    assert printed.returncode == 0 and yaml.safe_load(printed.stdout) == yaml.safe_load(target.read_text())


def test_damaged_input_with_pipeline_debug_off_is_one_line(tmp_path):
    """PIPELINE_DEBUG=0 (or false) is off: only 1, true, yes or on show tracebacks."""
    for value, traceback in [("0", False), ("false", False), ("1", True)]:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "validate", "--params", str(tmp_path / "nope.yaml")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PIPELINE_DEBUG": value})
        assert proc.returncode != 0 and ("Traceback" in proc.stderr) is traceback, (value, proc.stderr[-2000:])


@pytest.mark.parametrize(("content", "expected"), [
    (b"tasks: [1, 2\n", "not valid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)"),
    (b"seed: 1\ntasks:\n\tlm: {}\n", "not valid YAML: found character '\\t' that cannot start any token (line 3"),
    (b"seed: 1\nseed: 2\n", "not valid YAML: key 'seed' appears twice in one mapping (line 2, column 1)"),
    (b"\xff\xfeseed: 1\n", "not UTF-8 text (byte 0): is it a YAML file?"),
    (b"", "is empty (run `pipeline compose` to write a full config)"),
    (b"# only a comment\n", "is empty"),
], ids=["unclosed", "tab", "duplicate-key", "utf16", "empty", "comment-only"])
def test_damaged_params_file_is_named_in_one_line(tmp_path, content, expected):
    """A hand-edited params.yaml that YAML cannot read: the stages (and so `dvc repro`) and the
    `pipeline` command stop with one line naming the file and the line, not a traceback; a key
    given twice is refused rather than the later value silently winning."""
    from pipeline.config import ConfigError, load_config

    params = tmp_path / "params.yaml"
    params.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(params)
    assert str(err.value).startswith(str(params)) and expected in str(err.value), str(err.value)
    for cmd in (["stages.prepare", "lm"], ["pipeline", "validate"]):
        proc = subprocess.run([sys.executable, "-m", *cmd, "--params", str(params)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (cmd, proc.stderr[-2000:])


def test_damaged_params_path_and_override_values_are_named(tmp_path):
    """A directory given as the params file, an override value YAML cannot parse, a key under a
    value, and a config group picked without Hydra: each one line naming what is wrong."""
    from pipeline.config import ConfigError, load_config
    from pipeline.config.loading import apply_overrides
    from tests.conftest import tiny_raw

    with pytest.raises(ConfigError, match=r"is a directory, not a YAML file"):
        load_config(tmp_path)
    cases = [("tasks.lm.optim.lr=[1,", r"tasks\.lm\.optim\.lr: the value '\[1,' is not valid YAML"),
             ("seed.x=1", r"seed\.x: unknown key \(seed is a value, not a section\)"),
             ("strategy=fsdp", r"strategy: is a section, not a value; set one of its keys \(strategy\.<key>=\.\.\.\)"),
             ("tasks.lmm.trainer.max_steps=5", r"tasks\.lmm\.trainer\.max_steps: unknown key \(no section "
                                               r"'tasks\.lmm'; tasks has: diffusion, lm\)")]
    for override, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            apply_overrides(tiny_raw(), [override])
    assert apply_overrides(tiny_raw(), ["tasks.lm.optim.lr=0.5"])["tasks"]["lm"]["optim"]["lr"] == 0.5
    from pipeline.config.loading import read_yaml  # anchors and merge keys a user wrote stay legal

    merged = tmp_path / "anchors.yaml"
    merged.write_text("base: &b {a: 1, b: 2}\nderived: {<<: *b, b: 3}\nx: &x {p: 1}\nboth: {<<: [*x, *b]}\n")
    assert read_yaml(merged) == {"base": {"a": 1, "b": 2}, "derived": {"a": 1, "b": 3}, "x": {"p": 1},
                                 "both": {"p": 1, "a": 1, "b": 2}}


def test_damaged_cli_input_is_one_line_and_changes_nothing(tmp_path):
    """The `pipeline` command on a newcomer's mistakes: a plan that does not fit exits 1 (a script
    can tell), overrides may follow the options, fp8 is not planned for a CPU, a read-only
    registry query on a checkout with no tracking store creates none, a cluster nothing answers
    at and a sweep of 0 trials are one line each (exit 2)."""
    import socket

    import yaml

    from tests.conftest import tiny_raw

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw()))

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "RAY_ADDRESS")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=180, env={**env, "PYTHONPATH": str(ROOT)})

    small = run("plan", "lm", "--params", str(params), "--device-memory", "1MiB", "--workers", "2",
                "strategy.name=fsdp")  # (the override after the options)
    assert small.returncode == 1, small.stderr[-2000:]
    assert "fsdp (FSDP2" in small.stdout and "does NOT fit; not even micro-batch 1 fits" in small.stdout
    fits = run("plan", "lm", "--params", str(params), "--device-memory", "8GiB")
    assert fits.returncode == 0 and "fits; largest micro-batch that fits:" in fits.stdout, fits.stderr[-2000:]

    def one_line(proc: subprocess.CompletedProcess, fragment: str) -> None:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]

    one_line(run("plan", "lm", "--params", str(params), "precision.dtype=fp8"),
             "precision.dtype: fp8 needs a GPU with float8 tensor cores")
    one_line(run("lineage", "pipeline-lm@champion", "--params", str(params)), "no tracking store at sqlite:///")
    assert not list(tmp_path.glob("*.db")), list(tmp_path.iterdir())  # nothing created by looking
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one_line(run("status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"), f"127.0.0.1:{port}")
    one_line(run("sweep", "lm", "--params", str(params), "--trials", "0"), "--trials: must be at least 1 (got 0)")


def test_damaged_shard_tokenizer_is_named_by_every_reader(tmp_path, built_data):
    """The shards' tokenizer.json swapped for another (valid) one, truncated or deleted after the
    shard stage: the train stage's driver, evaluation and export each stop in one line naming
    the file, checked against the manifest's `tokenizer_sha256` (a swapped tokenizer gave
    garbage samples and was shipped inside the exported model)."""
    import shutil

    from pipeline.config import validate
    from pipeline.data.shard_tokenizer import checked_tokenizer, load_tokenizer
    from pipeline.flows.export import export
    from pipeline.flows.train import train_task
    from tests.conftest import tiny_raw

    _, shards = built_data
    mine = tmp_path / "shards"
    shutil.copytree(shards["lm"], mine)
    tokenizer = mine / "tokenizer.json"
    assert checked_tokenizer(mine) == tokenizer and load_tokenizer(mine).get_vocab_size() > 0
    assert checked_tokenizer(shards["diffusion"]) is None  # images: no tokenizer, nothing to check
    cfg = validate(tiny_raw([f"cluster.storage_path={tmp_path / 'store'}"]))
    original = tokenizer.read_text()
    swapped = json.dumps(json.loads(original), indent=1)  # the same vocabulary, other bytes: not the same file
    for damage, expected in ((swapped, "is not the tokenizer the shards were written with"),
                             (original[: len(original) // 2], "is not the tokenizer the shards were written with"),
                             (None, "is missing: the tokenizer the shards were written with")):
        if damage is None:
            tokenizer.unlink()
        else:
            tokenizer.write_text(damage)
        pattern = re.escape(str(tokenizer)) + " " + re.escape(expected)
        for reader in (lambda: checked_tokenizer(mine), lambda: load_tokenizer(mine),
                       lambda: export(cfg, "lm", tmp_path / "no-model", mine, tmp_path / "out", tmp_path / "m"),
                       lambda: train_task(cfg, "lm", mine, tmp_path / "model", tmp_path / "m")):
            with pytest.raises(ShardError, match=pattern) as e:
                reader()
            assert "\n" not in str(e.value)
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_damaged_training_config_is_named_by_validate(tmp_path, capsys):
    """`pipeline validate` (and `submit` before `dvc repro`) runs the train stage's checks that
    need only the config, per task: a batch that does not split over the workers or its
    accumulation, fp8 on CPUs; it said "ok" and the train stage refused after prepare and shard.
    `--task` checks only the tasks a run will train."""
    import yaml

    from pipeline.cli import main
    from tests.conftest import tiny_raw

    def validate_cli(*extra: str, task: list[str] | None = None) -> tuple[int, str]:
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(tiny_raw(list(extra))))
        argv = ["validate", "--params", str(params), *[a for t in task or [] for a in ("--task", t)]]
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr()

    code, out = validate_cli()
    assert code == 0 and out.out.strip().endswith("params.yaml: ok")
    code, out = validate_cli("cluster.num_workers=3")
    assert code == 2 and re.match(r"error: \[(lm|diffusion)\] tasks\.\1\.trainer\.global_batch_size \(\d+\) must split "
                                  r"evenly", out.err), out.err
    code, out = validate_cli("tasks.diffusion.trainer.grad_accum_steps=3")
    assert code == 2 and out.err.startswith("error: [diffusion] tasks.diffusion.trainer.global_batch_size (16)")
    assert validate_cli("tasks.diffusion.trainer.grad_accum_steps=3", task=["lm"])[0] == 0
    code, out = validate_cli("precision.dtype=fp8")
    assert code == 2 and "fp8 needs a GPU with float8 tensor cores" in out.err and len(out.err.splitlines()) == 1


def test_damaged_stage_order_names_the_stage_to_run(tmp_path):
    """The shard stage before prepare (or on a cut-short stats.json) names the file and the stage."""
    from pipeline.config import validate
    from pipeline.data.build import shard
    from pipeline.training.checkpoint import DamagedFile
    from tests.conftest import tiny_raw

    data = validate(tiny_raw()).task("lm").data
    with pytest.raises(FileNotFoundError, match=r"prepared/stats.json is missing: run the prepare stage first"):
        shard(data, tmp_path / "prepared", tmp_path / "shards")
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "stats.json").write_text('{"documents": 3')
    with pytest.raises(DamagedFile, match=r"stats.json is damaged \(not valid JSON: .*; run the prepare stage again\)"):
        shard(data, tmp_path / "prepared", tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
