"""The settings options of ``brainrecon run`` / ``compare`` / ``demo``, made from the config schema.

Every field of :class:`~brainrecon.pipeline.PipelineConfig` (decoding, network, evaluation) and every
top-level field of :class:`~brainrecon.recon.config.ReconConfig` that the run does not already have
becomes an option: its name is the field's (``image_size`` -> ``--image-size``; a few keep their
historical names, :data:`RENAMED`), its help the field's description, its type the field's. A
field with no option of its own (a prior's sub-model, a dict of keyword arguments) is set with
``--set recon.fourier.lr=0.05`` (a dotted path, the value read as YAML). The YAML run file takes the
same names, or the field names (a run's ``config.json``).
"""
from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer.core import TyperCommand

# field -> (option name, inverted): historical option names the tests and users rely on
RENAMED = {"layer_rois": ("layer_roi", False), "true_feature_recon": ("no_true_features", True),
           "exclude_labels": ("exclude_label", False)}
SET_HELP = ("any setting as DOTTED.PATH=VALUE, the value read as YAML, e.g. --set recon.fourier.lr=0.05 or "
            "--set executor_options='{n_workers: 4}' (repeatable; see docs/usage.md)")
_SETTINGS_KEY = "brainrecon.settings"   # where a command's settings options wait for it (click context meta)


class SettingsError(ValueError):
    """A settings option or ``--set`` item that cannot be read; the message names it and the fix."""


@dataclass(frozen=True)
class SettingOption:
    """One generated option: ``dest`` (parameter and YAML key), ``path`` (place in the config tree),
    ``kind`` (scalar, bool, inverted, list, pairs), ``item`` (the Python type of a value or list item)."""
    dest: str
    path: tuple[str, ...]
    kind: str
    item: type
    help: str
    default: Any

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _unwrap(annotation):
    """(inner type, origin) of ``X | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    return annotation, typing.get_origin(annotation)


def option_kind(annotation) -> tuple[str, type] | None:
    """How a field of this type is given on the command line, or None (by --set only)."""
    inner, origin = _unwrap(annotation)
    if inner is bool:
        return "bool", bool
    if inner in (int, float, str):
        return "scalar", inner
    if inner is Path:
        return "scalar", str
    if origin is Literal:
        return "scalar", str
    args = typing.get_args(inner)
    if origin is list and args and args[0] in (int, float, str):
        return "list", args[0]
    if origin is dict and len(args) == 2 and args[0] is str and args[1] in (int, float, str):
        return "pairs", args[1]
    return None


def _help(info: FieldInfo, annotation, inverted: bool) -> str:
    text = info.description or ""
    inner, origin = _unwrap(annotation)
    if origin is Literal:
        choices = [str(c) for c in typing.get_args(inner)]
        if not all(c in text for c in choices):
            text += f" ({' | '.join(choices)})"
    default = info.get_default(call_default_factory=True)
    if not inverted and default not in (None, [], {}, ""):
        shown = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in default) \
            if isinstance(default, list) else default
        text += f" [default: {shown}]"
    return text.strip()


def is_submodel(annotation) -> bool:
    inner, _ = _unwrap(annotation)
    return isinstance(inner, type) and issubclass(inner, BaseModel)


def setting_options() -> list[SettingOption]:
    """The settings options: every PipelineConfig field that has a command-line form, then the
    ReconConfig fields the run does not have itself (``--iterations``, ``--prior``, ``--device``...)."""
    from .pipeline import PipelineConfig
    from .recon.config import ReconConfig

    out, taken = [], set()
    for model, prefix in ((PipelineConfig, ()), (ReconConfig, ("recon",))):
        for name, info in model.model_fields.items():
            if name in taken or is_submodel(info.annotation):
                continue
            taken.add(name)
            how = option_kind(info.annotation)
            if how is None:
                continue
            dest, inverted = RENAMED.get(name, (name, False))
            kind = "inverted" if inverted else how[0]
            out.append(SettingOption(dest, (*prefix, name), kind, how[1], _help(info, info.annotation, inverted),
                                     info.get_default(call_default_factory=True)))
    return out


def option_parameters(options: list[SettingOption], defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """Typer parameters of ``options`` and ``--set`` (default None: an option not given leaves the
    config file's value); ``defaults`` {dest: value}: options that default to a value instead."""
    params = []
    for o in options:
        default = (defaults or {}).get(o.dest)
        help_text = o.help if default is None else f"{o.help.split(' [default:')[0]} [default: {default}]"
        decls = [f"{o.flag}/--no-{o.flag[2:]}"] if o.kind == "bool" else [o.flag]
        ann = {"bool": Optional[bool], "inverted": Optional[bool], "pairs": Optional[list[str]],
               "list": Optional[str]}.get(o.kind, Optional[o.item])
        info = typer.Option(default, *decls, help=help_text, show_default=False)
        params.append(inspect.Parameter(o.dest, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=ann))
    params.append(inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                                    default=typer.Option(None, "--set", help=SET_HELP)))
    return params


def _click_params(params: list[inspect.Parameter]) -> list:
    """The click parameters typer makes of ``params`` (a throwaway one-command app)."""
    def command(**kwargs):
        pass
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    tmp = typer.Typer(add_completion=False)
    tmp.command()(command)
    return list(typer.main.get_command(tmp).params)


def settings_command(app: typer.Typer, options: Callable[[], list[SettingOption]],
                     defaults: dict[str, Any] | None = None):
    """Decorator: register ``fn(..., *, settings)`` as a command of ``app`` with its own parameters and
    the settings options ``options()`` plus ``--set``; ``fn`` receives ``settings`` {dest: value or
    None} (``set_``: the ``--set`` items). The settings options are made when the command is used
    (its help or a call), so that the other commands need not import the pipeline."""
    class Command(TyperCommand):
        _all: list | None = None

        @property
        def params(self) -> list:   # one list, made once (click appends to it)
            if self._all is None:
                self._all = self._own + _click_params(option_parameters(options(), defaults))
            return self._all

        @params.setter
        def params(self, value: list) -> None:
            self._own, self._all = list(value), None

        def invoke(self, ctx):
            own = {p.name for p in self._own}
            extra = {k: ctx.params.pop(k) for k in list(ctx.params) if k not in own}
            ctx.meta[_SETTINGS_KEY] = {k: (list(v) or None) if isinstance(v, tuple) else v for k, v in extra.items()}
            return super().invoke(ctx)

    def register(fn):
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "settings"]
        hints = typing.get_type_hints(fn)

        def command(_settings_ctx: typer.Context, **kwargs):
            return fn(**kwargs, settings=_settings_ctx.meta.get(_SETTINGS_KEY, {}))

        ctx_param = inspect.Parameter("_settings_ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                      annotation=typer.Context)
        command.__signature__ = inspect.Signature([ctx_param, *params])
        command.__annotations__ = {"_settings_ctx": typer.Context,
                                   **{p.name: hints.get(p.name, p.annotation) for p in params}}
        command.__name__, command.__doc__, command.__module__ = fn.__name__, fn.__doc__, fn.__module__
        app.command(cls=Command)(command)
        return fn
    return register


def parse_value(o: SettingOption, value: Any) -> Any:
    """A value given for option ``o`` (flag text or YAML value) -> the field's value."""
    if o.kind == "inverted":
        return not value
    if o.kind == "pairs":
        return value   # converted by the caller (NAME=VALUE lists and mappings)
    if o.kind == "list" and isinstance(value, str):
        text = value.strip()
        if text.lower() == "none" and o.item is int:
            return []
        try:
            return [o.item(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            kind = {int: "integers", float: "numbers", str: "names"}[o.item]
            raise SettingsError(f"{o.flag} {value!r}: give comma-separated {kind}, e.g. "
                                f"{'0,10,50' if o.item is int else '1,10,100' if o.item is float else 'a,b'}"
                                f"{', or none' if o.item is int else ''}") from None
    return value


def set_in(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """tree[path[0]][path[1]]... = value (dicts made on the way; a mapping given for a sub-model is merged)."""
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    old = tree.get(path[-1])
    tree[path[-1]] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value


def model_at(root: type[BaseModel], path: tuple[str, ...]) -> type[BaseModel] | None:
    """The pydantic model of the sub-config at ``path`` (None where the path leaves the models)."""
    model = root
    for key in path:
        info = model.model_fields.get(key) if model is not None else None
        if info is None or not is_submodel(info.annotation):
            return None
        model = _unwrap(info.annotation)[0]
    return model


def resolve_set(root: type[BaseModel], item: str) -> tuple[tuple[str, ...], Any]:
    """``--set a.b.c=VALUE`` -> (("a", "b", "c"), VALUE parsed as YAML); the path must name a setting."""
    import yaml

    key, sep, text = item.partition("=")
    path = tuple(p for p in key.strip().split("."))
    if not sep or not key.strip() or "" in path:
        raise SettingsError(f"--set {item!r}: write it as DOTTED.PATH=VALUE, e.g. --set recon.fourier.lr=0.05")
    model, where = root, ()
    for name in path:
        if model is None:          # inside a dict-valued setting: any key
            break
        if name not in model.model_fields:
            place = ".".join(where) or "the run"
            valid = ", ".join(".".join((*where, k)) for k in model.model_fields)
            raise SettingsError(f"--set {item!r}: {name!r} is not a setting of {place}; valid: {valid}")
        where = (*where, name)
        model = model_at(root, where)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise SettingsError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return path, value
