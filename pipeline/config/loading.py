"""Load, override and validate the composed configuration.

`dvc exp run` composes `configs/` with Hydra and writes `params.yaml`; `dvc repro` reads the
`params.yaml` that is there. Stages call `load_config`, which validates it and turns every
problem into a single line that names the offending key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.pretrained import resolve_pretrained
from pipeline.config.schema import PipelineConfig

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key."""


_UNION_TAGS = ("text", "images", "gpt", "dit", "unet", "ddp", "fsdp", "deepspeed", "horovod")
_UNION_FIELDS = ("data", "model", "strategy")  # the discriminated unions those tags choose between


def _keyed(loc: list[str], msg: str) -> str:
    """`msg` under its dotted key. A section's check that already names its keys from the
    section down ("precision.fp8_emulate=true needs ...") or in full is not prefixed again
    ("precision: precision.fp8_emulate..."); under a deeper path it gets only the parents."""
    key = ".".join(loc)
    if not key:
        return msg  # whole-config checks name their keys
    for start in range(len(loc)):
        named = ".".join(loc[start:])
        if msg.startswith((f"{named}.", f"{named}=")):
            return ".".join([*loc[:start], msg])
    return f"{key}: {msg}"


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # Drop pydantic's discriminated-union tags ("text", "gpt") from the dotted path: where they
        # follow a union field (data, model, strategy), not a task someone named "text"
        parts = [str(p) for p in e["loc"]]
        loc = [p for i, p in enumerate(parts)
               if not (p in _UNION_TAGS and i > 0 and parts[i - 1] in _UNION_FIELDS)]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) or \
            f"(got {got!r})" in msg else f" (got {got!r})"  # (a check that names the input itself: once)
        lines.append(_keyed(loc, msg) + shown)
    return "; ".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently, so a pasted duplicate would override the value above it unseen)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, it is no key of its own
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            continue  # (a complex key: the mapping's own constructor says what is wrong with it)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a YAML error: what is wrong, and where (line, column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def read_yaml(path: Path, empty_hint: str = "") -> Any:
    """A YAML file's content; every way it can be unreadable (missing, a directory, not UTF-8,
    not YAML, empty, a duplicated key) is a one-line `ConfigError` naming the file;
    `empty_hint` says what to do about an empty one."""
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory, not a YAML file")
    if not path.is_file():
        if outside := _outside_project(path):
            raise ConfigError(f"config file '{path}' not found, and {outside}")
        raise ConfigError(f"config file '{path}' not found (run `dvc exp run` or `pipeline compose` to create it)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): is it a YAML file?") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if raw is None:
        raise ConfigError(f"{path} is empty" + (f" ({empty_hint})" if empty_hint else ""))
    return raw


def _override_value(value: str) -> Any:
    """An override's value as Hydra reads `dvc exp run -S` values: YAML 1.2, where `off`, `yes`
    and `12:30` are strings (YAML 1.1, PyYAML's, made them False, True and 750) and `1e-3` is a
    number."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(value)


def _merge(node: dict[str, Any], key: str, value: dict[str, Any]) -> None:
    """Set `value` (a mapping) under `key`, merged into the section already there as Hydra merges
    `-S 'trainer={max_steps: 5}'`: the keys it names change, the others keep their values (a
    replaced section fell back to the schema's defaults, silently: validation off)."""
    if not isinstance(node.get(key), dict):
        node[key] = value
        return
    for k, v in value.items():
        if isinstance(v, dict):
            _merge(node[key], k, v)
        else:
            node[key][k] = v


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML 1.2, as Hydra does) to a nested dict,
    in place; a mapping value is merged into its section."""
    from ruamel.yaml import YAMLError
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node.get(p), dict):
                where = ".".join(parts[:i + 1])
                if p in node:
                    raise ConfigError(f"{key}: unknown key ({where} is a value, not a section)")
                known = sorted(k for k, v in node.items() if isinstance(v, dict))
                parent = ".".join(parts[:i]) or "the config"
                listed = f"; {parent} has: {', '.join(known)}" if 0 < len(known) <= 12 else ""
                group = ("; a group option (model@tasks.lm.model=gpt_1b) is chosen when configs/ is composed: "
                         "`pipeline plan --compose`, `pipeline compose` or `dvc exp run -S`") if "@" in key else ""
                raise ConfigError(f"{key}: unknown key (no section '{where}'{listed}){group}")
            node = node[p]
        try:
            parsed = _override_value(value)
        except YAMLError as e:
            raise ConfigError(f"{key}: the value {value!r} is not valid YAML: {_yaml_problem(e)}") from None
        if isinstance(node.get(parts[-1]), dict) and not isinstance(parsed, dict) and parsed is not None:
            raise ConfigError(f"{key}: is a section, not a value; set one of its keys ({key}.<key>=...), or pick a "
                              f"config group option with Hydra (`pipeline compose {item}`, `dvc exp run -S {item}`, "
                              "`pipeline plan --compose`)")
        if isinstance(parsed, dict):
            _merge(node, parts[-1], parsed)
        else:
            node[parts[-1]] = parsed
    return raw


def validate(raw: dict[str, Any]) -> PipelineConfig:
    """The typed config; a GPT with `model.init_from` first takes its architecture from that
    Hugging Face checkpoint's config.json (`pretrained.resolve_pretrained`)."""
    try:
        tasks = raw.get("tasks")
        if isinstance(tasks, dict):
            raw = {**raw, "tasks": {name: _resolve_task(name, t) for name, t in tasks.items()}}
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err) + _strategy_hint(raw, err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _strategy_hint(raw: dict[str, Any], err: ValidationError) -> str:
    """`-S strategy.name=horovod` renames the strategy but keeps the composed group's other keys
    (DDP's `backend: auto`, DeepSpeed's `zero_stage`), which the new one refuses: say to pick the
    group, whose keys fit it."""
    section = raw.get("strategy")
    name = section.get("name") if isinstance(section, dict) else None
    if not isinstance(name, str) or not any(e["loc"][:1] == ("strategy",) for e in err.errors()):
        return ""
    return (f"; if strategy.name was set to switch strategies, choose its config group instead (its keys fit it): "
            f"`dvc exp run -S strategy={name}` or `pipeline compose strategy={name}`")


def _resolve_task(name: str, task: Any) -> Any:
    if not isinstance(task, dict) or not isinstance(task.get("model"), dict):
        return task
    return {**task, "model": resolve_pretrained(task["model"], f"tasks.{name}.model")}


def load_config(path: Path | str = DEFAULT_PARAMS, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read params.yaml (or another file), apply overrides and validate."""
    path = Path(path)
    raw = read_yaml(path, "run `pipeline compose` to write a full config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return validate(apply_overrides(raw, overrides))


def config_digest(obj: Any) -> str:
    """A stable short hash of a config (or any JSON-able value): keys a Ray run to its settings."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def compose(config_dir: Path | str = "configs", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose `configs/` with Hydra the way `dvc exp run` does, as a plain dict. A Hydra or
    OmegaConf problem (an unknown group option or key, an unparsable override, a missing
    config folder), and a config file that is not UTF-8 or not valid YAML (a syntax error, a key
    given twice), is a one-line `ConfigError` that names it (the file, with line and column)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    root = Path(config_dir).resolve()
    if not (root / "config.yaml").is_file():
        outside = _outside_project(Path(config_dir))
        raise ConfigError(f"--config-dir: no config.yaml in '{config_dir}'" + (f"; {outside}" if outside else ""))
    private = _private_choice(root, overrides)
    if private is not None:
        raise ConfigError(private)
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_hydra_message(e, overrides)) from None
    except yaml.YAMLError as e:  # Hydra lets a group file's or config.yaml's YAML error through as is
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        name = getattr(mark, "name", None) or getattr(e, "name", None)
        where = name if name and Path(name).is_file() else f"a YAML file under '{config_dir}'"
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:  # Hydra reads each file as UTF-8 text before YAML sees it
        raise ConfigError(_undecodable_config(root, e)) from None


def _undecodable_config(root: Path, err: UnicodeDecodeError) -> str:
    """One line naming the config file that is not UTF-8, with the byte's offset: the error
    itself names no file, so take the path Hydra was reading (its frame's `full_path`), else the
    first `.yaml` under `root` that does not decode."""
    tb, path = err.__traceback__, None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("full_path")
        path = Path(candidate) if isinstance(candidate, str) and Path(candidate).is_file() else path
        tb = tb.tb_next
    candidates = [path] if path is not None else sorted(root.rglob("*.yaml"))
    for candidate in candidates:
        try:
            candidate.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            return f"{candidate}: not UTF-8 text (byte {e.start}): is it a YAML file?"
        except OSError:
            continue
    return f"a config file under '{root}' is not UTF-8 text ({err.reason})"


def _outside_project(relative_to: Path) -> str:
    """Why a relative path the project's commands default to is not found, when the command runs
    outside the project's root (no dvc.yaml here); "" otherwise."""
    if relative_to.is_absolute() or Path("dvc.yaml").is_file():
        return ""
    return f"{Path.cwd()} is not the project's root (no dvc.yaml here): run this from the folder holding dvc.yaml " \
           "and configs/"


def _private_choice(root: Path, overrides: Sequence[str]) -> str | None:
    """An override picking a group's `_`-prefixed file (a base the presets extend, not a preset:
    Hydra would take it and give a model named `custom`), as one line, or None."""
    for override in overrides:
        left, sep, option = override.lstrip("+").partition("=")
        group = left.split("@")[0]
        if sep and option.startswith("_") and (root / group / f"{option}.yaml").is_file():
            options = sorted(p.stem for p in (root / group).glob("*.yaml") if not p.stem.startswith("_"))
            return f"{override}: '{option}' is a base the '{group}' presets share, not one of them (options: " \
                   f"{', '.join(options)})"
    return None


def _hydra_message(err: Exception, overrides: Sequence[str]) -> str:
    """One line for a composition error: the override at fault and what is wrong with it."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, name = err.missing_cfg_file.rsplit("/", 1)
        culprit = next((o for o in overrides if o.lstrip("+~").split("=")[0].split("@")[0] == group), group)
        options = [o for o in (err.options or []) if not o.startswith("_")]  # _-prefixed: shared bases
        return f"{culprit}: no config '{name}' in group '{group}' (options: {', '.join(options) or 'none'})"
    if isinstance(err, OverrideParseException):
        lines = str(err).splitlines()
        caret = next((ln for ln in lines if ln.strip() == "^"), None)
        if caret is not None and lines.index(caret) > 0:
            # Hydra's lexer: the override, then a caret under the character it could not read
            at = caret.index("^") - len(lines[lines.index(caret) - 1]) + len(err.override)
            char = err.override[at] if 0 <= at < len(err.override) else None
            detail = f"cannot read {char!r} at position {at + 1}" if char else "cannot parse it"
            if char in ("~", "#", "'", "&", "$", "%", "\\", "(", ")", "{", "}", "[", "]", " ", ",", ":"):
                key, _, value = err.override.partition("=")
                quoted = f"'{key}=\"{value}\"'" if "'" in value else f"\"{key}='{value}'\""
                detail += f" (quote a value holding it: {quoted})"
            return f"override '{err.override}': {detail}"
        lines = [ln for ln in lines if ln.strip() and not ln.startswith("See https://")]
        detail = lines[-1] if lines else "cannot parse"
        return f"override '{err.override}': {detail} (expected key=value, +key=value or group=option)"
    text = " ".join(ln.strip() for ln in str(err).splitlines()
                    if ln.strip() and not ln.startswith(("See https://", "To append", "Config search path", "\t")))
    match = re.match(r"Could not override '([^']+)'", text)
    if match and "not in struct" in str(err.__cause__ or ""):
        return f"{match.group(1)}: unknown key"
    full_key = getattr(err, "full_key", None)  # OmegaConf errors (a failed interpolation) name the key
    text = text.split(" full_key:")[0].strip() or type(err).__name__  # OmegaConf appends key and type
    return f"{full_key}: {text}" if full_key else text


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict to dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
