"""YAML file + dotted command-line overrides -> one validated, typed :class:`Config` (docs/design.md section 3).

Every key has a type annotation; values are checked against it as they are set, so an error names the exact key
(file or override) and says how to fix it. Checkpoints store :func:`config_to_dict` (plain data, loadable with
``torch.load(weights_only=True)``) and :func:`config_from_dict` rebuilds a config from it with the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from . import methods
from .config_schema import (  # noqa: F401  (the schema is part of this module's API)
    CHECKS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KEYS,
    SECTIONS,
    TOP_KEYS,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    option_types,
)
from .config_types import Dumper, Loader, Mismatch, coerce, describe
from .errors import RefconvError
from .methods.legacy import LEGACY_SECTIONS, legacy_error, translate_legacy


def _unknown(key: str) -> RefconvError:
    """Error for a key that does not exist, suggesting the closest valid dotted key (also matched by its leaf)."""
    keys = [*TOP_KEYS, *KEYS, *(f"{m}.{k}" for m in methods.names() for k in option_types(m))]
    close = difflib.get_close_matches(key, keys, n=1)
    if not close:
        leaves = {k.rsplit(".", 1)[1]: k for k in keys if "." in k}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=1)]
    hint = f" (did you mean '{close[0]}'?)" if close else f"; valid sections: {', '.join(_sections())}"
    return RefconvError(f"unknown config key '{key}'{hint}")


def _sections() -> list[str]:
    return [*SECTIONS, *methods.names()]


def _key_type(key: str) -> Any:
    """Type annotation of the field that dotted ``key`` sets (``model.kwargs.<name>`` sets ``model.kwargs``)."""
    section, _, rest = key.partition(".")
    name, _, sub = rest.partition(".")
    if section in LEGACY_SECTIONS:
        raise legacy_error(key)
    if not rest:
        return TOP_KEYS.get(key) or _raise(_unknown(key))
    if section not in SECTIONS and section in methods.names():
        tp = option_types(section).get(name)
        if tp is None or sub:
            close = difflib.get_close_matches(name, option_types(section), n=1)
            hint = f"did you mean '{section}.{close[0]}'?" if close else \
                f"method {section}'s options: {', '.join(option_types(section)) or 'none'}"
            raise RefconvError(f"unknown config key '{key}' ({hint})")
        return tp
    tp = KEYS.get(f"{section}.{name}")
    if tp is None or (sub and typing.get_origin(tp) is not dict):
        raise _unknown(key)
    return tp


def _raise(error: Exception) -> Any:
    raise error


def _set(cfg: Config, key: str, value: Any) -> None:
    """Set dotted ``key`` (``section.key``, ``model.kwargs.<name>``, a top-level key or ``<method>.<option>``) to
    ``value``, checking its type."""
    tp = _key_type(key)
    section, name, *sub = key.split(".", 2) if "." in key else (None, key)
    if sub:
        value = {**getattr(getattr(cfg, section), name), sub[0]: value}
    try:
        value = coerce(value, tp)
    except Mismatch:
        if typing.get_origin(tp) is Literal:
            allowed = ", ".join(typing.get_args(tp))
            raise RefconvError(f"config key '{key}' must be one of {allowed}; got {value!r}") from None
        got = f"{value!r} ({type(value).__name__})"
        raise RefconvError(f"config key '{key}' expects {describe(tp)}, got {got}") from None
    if section is None:
        setattr(cfg, name, value)
    elif section in SECTIONS:
        setattr(getattr(cfg, section), name, value)
    else:
        setattr(cfg.options.setdefault(section, methods.get(section).options()), name, value)


def _apply_mapping(cfg: Config, data: Any, where: str) -> None:
    """Apply a nested ``{section: {key: value}}`` mapping (YAML file or stored dict); missing keys keep defaults."""
    if not isinstance(data, Mapping):
        raise RefconvError(f"{where} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    methods.import_plugins(data.get("plugins") or [])  # they register methods whose sections may follow
    for section, keys in data.items():
        if section in LEGACY_SECTIONS:
            raise legacy_error(str(section))
        if section in TOP_KEYS:
            _set(cfg, section, keys)
            continue
        if section not in _sections() and isinstance(keys, Mapping):
            close = difflib.get_close_matches(str(section), _sections(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; valid sections: {', '.join(_sections())}"
            raise RefconvError(f"unknown config section '{section}'{hint}")
        if section not in _sections():
            raise _unknown(str(section))
        if keys is not None and not isinstance(keys, Mapping):
            raise RefconvError(f"config section '{section}' in {where} must be a mapping of keys, got {keys!r}")
        for key, value in (keys or {}).items():
            _set(cfg, f"{section}.{key}", value)


def _finish(cfg: Config, name: str) -> Config:
    """Substitute ``<name>`` in ``train.output`` and check value ranges (after all keys are set)."""
    cfg.train.output = cfg.train.output.replace("<name>", re.sub(r"[/:\\]", "_", name))
    for key, (ok, text) in CHECKS.items():
        section, attr = key.split(".")
        value = getattr(getattr(cfg, section), attr)
        if not ok(value):
            raise RefconvError(f"config key '{key}' must {text}, got {value!r}")
    cfg.options.setdefault(cfg.method, methods.get(cfg.method).options())  # an unknown method: one-line error
    for name, options in cfg.options.items():
        for attr, (ok, text) in getattr(options, "CHECKS", {}).items():
            if not ok(getattr(options, attr)):
                raise RefconvError(f"config key '{name}.{attr}' must {text}, got {getattr(options, attr)!r}")
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``'optim.lr=0.05'`` -> ``('optim.lr', 0.05)``; the value parses as a YAML scalar or flow value."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if key == "plugins" and sep:  # its modules register methods whose keys may follow
        value = yaml.load(text, Loader=Loader)
        methods.import_plugins(value if isinstance(value, list) else [value])
    if not sep or not key or " " in key:
        raise RefconvError(f"malformed override {item!r}: expected the form section.key=value, e.g. optim.lr=0.05")
    tp = _key_type(key)
    if tp is str or typing.get_origin(tp) is Literal:
        return key, text  # a name or path stays as typed, even if YAML would read it as a number or bool
    try:
        return key, yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        raise RefconvError(f"override {item!r}: value is not valid YAML ({getattr(e, 'problem', e)})") from None


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``section.key=value``), validated."""
    cfg = Config()
    overrides = [overrides] if isinstance(overrides, str) else overrides
    for item in overrides:  # plugins=[...] first: the file may hold the section of a method it registers
        if item.partition("=")[0].strip() == "plugins":
            parse_override(item)
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RefconvError(f"config file '{os.fspath(path)}' not found") from None
        except OSError as e:
            raise RefconvError(f"config file '{os.fspath(path)}' cannot be read: {e.strerror}") from None
        try:
            data = yaml.load(text, Loader=Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise RefconvError(f"config file '{os.fspath(path)}'{line}: invalid YAML ({problem})") from None
        _apply_mapping(cfg, {} if data is None else data, f"config file '{os.fspath(path)}'")
    for item in overrides:
        _set(cfg, *parse_override(item))
    return check_start(_finish(cfg, Path(path).stem if path is not None else cfg.model.name))


def check_start(cfg: Config) -> Config:
    """The chosen method's check of where the run starts (RefConv refuses to refocus random kernels unless asked
    for the paper's ablation). Checked on the configs runs start from, not on those stored in checkpoints (their
    weights are in the file)."""
    methods.get(cfg.method).check(cfg.method_options, cfg.model.pretrained)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (str/int/float/bool/None/list/dict only): safe for YAML and ``weights_only`` checkpoints.
    The method's options are the section of its name, after ``model``."""
    plain = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "options"}
    out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, list) else v
           for k, v in plain.items() if k in ("method", "plugins", "model")}
    out.update({name: dataclasses.asdict(options) for name, options in cfg.options.items()
                if dataclasses.fields(options)})  # no empty section for a method without options (none)
    out.update({k: dataclasses.asdict(v) for k, v in plain.items() if k in ("data", "optim", "train")})
    return out


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a config from :func:`config_to_dict` output (e.g. stored in a checkpoint); missing keys get defaults.
    A config stored before the top-level ``method`` key (``refocus.enabled``, ``reparam.method``) is translated."""
    cfg = Config()
    _apply_mapping(cfg, translate_legacy(data) if isinstance(data, Mapping) else data, "stored config")
    return _finish(cfg, cfg.model.name)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (parent directories created); :func:`load_config` reads it back equal."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=Dumper, sort_keys=False, default_flow_style=False)
    Path(path).write_text(text, encoding="utf-8")
