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
from dataclasses import dataclass
from typing import Any, Literal, Optional

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

# field -> (option name, inverted): historical option names the tests and users rely on
RENAMED = {"layer_rois": ("layer_roi", False), "true_feature_recon": ("no_true_features", True)}
SET_HELP = ("any setting as DOTTED.PATH=VALUE, the value read as YAML, e.g. --set recon.fourier.lr=0.05 or "
            "--set executor_options='{n_workers: 4}' (repeatable; see docs/usage.md)")


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


def _kind(annotation) -> tuple[str, type] | None:
    """How a field of this type is given on the command line, or None (by --set only)."""
    inner, origin = _unwrap(annotation)
    if inner is bool:
        return "bool", bool
    if inner in (int, float, str):
        return "scalar", inner
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
            how = _kind(info.annotation)
            if how is None:
                continue
            dest, inverted = RENAMED.get(name, (name, False))
            kind = "inverted" if inverted else how[0]
            out.append(SettingOption(dest, (*prefix, name), kind, how[1], _help(info, info.annotation, inverted),
                                     info.get_default(call_default_factory=True)))
    return out


def option_parameters(options: list[SettingOption], defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """Typer parameters of ``options`` (default None: a flag not given leaves the config file's value);
    ``defaults`` {dest: value}: options that default to a value instead (shown in the help)."""
    params = []
    for o in options:
        default = (defaults or {}).get(o.dest)
        help_text = o.help if default is None else f"{o.help.split(' [default:')[0]} [default: {default}]"
        if o.kind == "bool":
            info, ann = typer.Option(default, f"{o.flag}/--no-{o.flag[2:]}", help=help_text), Optional[bool]
        elif o.kind == "inverted":
            info, ann = typer.Option(default, o.flag, help=help_text), Optional[bool]
        elif o.kind == "pairs":
            info, ann = typer.Option(default, o.flag, help=help_text), Optional[list[str]]
        elif o.kind == "list":
            info, ann = typer.Option(default, o.flag, help=help_text), Optional[str]
        else:
            info, ann = typer.Option(default, o.flag, help=help_text, show_default=False), Optional[o.item]
        params.append(inspect.Parameter(o.dest, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=ann))
    params.append(inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                                    default=typer.Option(None, "--set", help=SET_HELP)))
    return params


class _SettingsCommand:
    """A command whose signature (read by typer when the CLI is built) is the function's own parameters
    followed by the settings options; built on first use, so that ``brainrecon --help`` and the other
    commands need not import the pipeline."""

    def __init__(self, fn, options, defaults):
        self.fn, self._options, self._defaults, self._params = fn, options, defaults, None
        self.__name__, self.__qualname__, self.__doc__, self.__module__ = (fn.__name__, fn.__qualname__, fn.__doc__,
                                                                          fn.__module__)

    def _build(self) -> list[inspect.Parameter]:
        if self._params is None:
            hints = typing.get_type_hints(self.fn)
            own = [p.replace(annotation=hints.get(p.name, p.annotation))
                   for p in inspect.signature(self.fn).parameters.values() if p.name != "settings"]
            self._params = own + option_parameters(self._options(), self._defaults)
        return self._params

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature(self._build())

    @property
    def __annotations__(self) -> dict:
        return {p.name: p.annotation for p in self._build()}

    def __call__(self, **kwargs):
        own = set(inspect.signature(self.fn).parameters) - {"settings"}
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k not in own}
        return self.fn(**kwargs, settings=settings)


def with_settings(options, defaults: dict[str, Any] | None = None):
    """Decorator: add the settings options ``options()`` (a list of :class:`SettingOption`) and ``--set``
    to a command ``fn(..., *, settings)``; the command receives ``settings`` {dest: value or None}
    (``set_``: the ``--set`` items)."""
    return lambda fn: _SettingsCommand(fn, options, defaults)


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
