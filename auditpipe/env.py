"""Environment overrides of the settings: one rule for every table.

``AUDITPIPE_<TABLE>_<KEY>`` sets ``[table] key``; nested tables are joined the same way::

    AUDITPIPE_KAFKA_BOOTSTRAP=kafka:9092            [kafka] bootstrap
    AUDITPIPE_SINKS_POSTGRES_DSN=postgresql://...   [sinks.postgres] dsn
    AUDITPIPE_SINKS_POSTGRES_STEPS=redact           [sinks.postgres] steps = ["redact"]
    AUDITPIPE_PIPELINE_STEPS=enrich,redact          [pipeline] steps
    AUDITPIPE_PIPELINE_SAMPLE_RATE=0.1              [pipeline.sample] rate

Names are matched case-insensitively against the tables and keys auditpipe knows (the
settings models, the installed sinks and steps, and the ``[sinks.NAME]`` tables of the file);
where a name could be split in more than one way, the longest known table or key name wins.
``__`` is an explicit separator for names the rule cannot split (``AUDITPIPE_SINKS__MY_SINK__DSN``).

Values: a list key takes ``a,b,c`` or a JSON array (``["a", "b"]``); a table-valued key
takes a JSON object; everything else is given to the settings model as a string, which parses
booleans (``true``/``false``/``1``/``0``) and numbers.

A variable that names a known table but no key of it is an error naming the variable and the
closest valid key. Variables that do not start with a table name (``AUDITPIPE_CONFIG``,
``AUDITPIPE_LOG``, ``AUDITPIPE_LOG_FORMAT``, ``AUDITPIPE_ENABLED``, ``AUDITPIPE_TEST_*``, a
step's secret such as ``AUDITPIPE_REDACT_HASH_KEY``...) are not settings overrides and are left
alone.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .errors import ConfigError

ENV_PREFIX = "AUDITPIPE_"
SEPARATOR = "__"

#: A node of the tree of known names: a leaf (``None``: a value; its annotation decides how
#: the string is parsed) or a mapping of child names to nodes, computed lazily.
Children = Callable[[], Mapping[str, "Node"]]


@dataclass(frozen=True)
class Node:
    children: Children | None = None
    annotation: Any = None  # of a leaf
    table: str = ""  # the dotted table name, for messages

    @property
    def is_table(self) -> bool:
        return self.children is not None


@dataclass(frozen=True)
class Override:
    """One environment variable resolved to a settings path."""

    var: str
    path: tuple[str, ...]
    value: Any


def _model_children(model: type[BaseModel], table: str) -> Children:
    def children() -> dict[str, Node]:
        out: dict[str, Node] = {}
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out[name] = Node(_model_children(ann, f"{table}.{name}"), table=f"{table}.{name}")
            else:
                out[name] = Node(annotation=ann)
        return out

    return children


def _step_children(prefix: str) -> dict[str, Node]:
    """``steps`` plus one table per installed step (its Config's keys)."""
    from auditpipe.steps import available_steps, load_step_class

    out: dict[str, Node] = {"steps": Node(annotation=list[str])}
    for name in available_steps():

        def step_keys(name: str = name) -> Mapping[str, Node]:
            cls = load_step_class(name, f"{prefix}.steps")
            return _model_children(cls.Config, f"{prefix}.{name}")()

        out.setdefault(name, Node(step_keys, table=f"{prefix}.{name}"))
    return out


def _sink_children(file_sinks: Mapping[str, Any]) -> Children:
    def children() -> dict[str, Node]:
        from auditpipe.sinks.base import available_sinks, load_sink_class

        out: dict[str, Node] = {}
        for name in sorted({*available_sinks(), *file_sinks}):

            def sink_keys(name: str = name) -> Mapping[str, Node]:
                cls = load_sink_class(name)
                keys = dict(_step_children(f"sinks.{name}"))
                keys.update(_model_children(cls.Config, f"sinks.{name}")())
                return keys

            out[name] = Node(sink_keys, table=f"sinks.{name}")
        return out

    return children


def settings_tree(root: type[BaseModel], data: Mapping[str, Any] | None = None) -> Node:
    """The names an override can reach: every table of ``root`` (``Settings``), the sinks and
    the pipeline steps. ``root`` is passed in: the settings module imports this one."""
    sinks = (data or {}).get("sinks")
    file_sinks = sinks if isinstance(sinks, Mapping) else {}

    def tables() -> dict[str, Node]:
        out = dict(_model_children(root, "")())
        out = {k: Node(v.children, v.annotation, k) for k, v in out.items()}
        out["sinks"] = Node(_sink_children(file_sinks), table="sinks")
        out["pipeline"] = Node(lambda: _step_children("pipeline"), table="pipeline")
        return out

    return Node(tables)


def _match(rest: str, children: Mapping[str, Any]) -> tuple[str, str] | None:
    """The longest child name ``rest`` starts with (then ``_``, ``__`` or its end), and what
    follows it. A name never reaches past an explicit ``__``."""
    limit = rest.find(SEPARATOR)
    best: tuple[str, str] | None = None
    for name in children:
        if limit >= 0 and len(name) > limit:
            continue
        if rest == name:
            tail = ""
        elif rest.startswith(name + SEPARATOR):
            tail = rest[len(name) + 2 :]
        elif rest.startswith(name + "_"):
            tail = rest[len(name) + 1 :]
        else:
            continue
        if best is None or len(name) > len(best[0]):
            best = (name, tail)
    return best


def _closest(rest: str, names: list[str]) -> str | None:
    head = rest.split(SEPARATOR, 1)[0]
    if not names:
        return None
    return max(names, key=lambda n: difflib.SequenceMatcher(None, head, n).ratio())


def resolve(var: str, tree: Node) -> tuple[tuple[str, ...], Node] | None:
    """The settings path ``var`` names and its leaf; None when it names no table.

    Raises ConfigError when it names a known table but no key of it.
    """
    if not var.upper().startswith(ENV_PREFIX):
        return None
    rest = var[len(ENV_PREFIX) :].lower()
    node, path = tree, list[str]()
    while True:
        assert node.children is not None
        children = node.children()
        hit = _match(rest, children)
        if hit is None:
            if not path:
                return None  # not a settings variable (AUDITPIPE_LOG, AUDITPIPE_TEST_...)
            names = sorted(children)
            best = _closest(rest, names)
            where = f"[{node.table}]"
            if path == ["sinks"]:
                raise ConfigError(
                    f"environment: {var}: no sink {rest.split(SEPARATOR)[0]!r}; installed sinks: "
                    f"{', '.join(names)} (name a sink with a table in the settings file as "
                    f"AUDITPIPE_SINKS__NAME__KEY)"
                )
            hint = f"; did you mean {_var_name([*path, best or ''])} ({node.table}.{best})?"
            raise ConfigError(
                f"environment: {var}: {where} has no key {rest!r}{hint if best else ''} "
                f"Valid keys: {', '.join(names)}"
            )
        name, rest = hit
        path.append(name)
        child = children[name]
        if not rest:
            if child.is_table:
                if len(path) == 1:
                    return None  # AUDITPIPE_<TABLE> alone: not an override
                raise ConfigError(
                    f"environment: {var}: [{child.table}] is a table; name one of its keys "
                    f"({_var_name([*path, 'KEY'])})"
                )
            return tuple(path), child
        if not child.is_table:
            raise ConfigError(
                f"environment: {var}: {'.'.join(path)} is a value, not a table; did you mean "
                f"{_var_name(path)}?"
            )
        node = child


def _var_name(path: list[str]) -> str:
    return ENV_PREFIX + "_".join(p.upper() for p in path)


def _is_list(ann: Any) -> bool:
    origin = typing.get_origin(ann)
    if origin in (list, tuple, set, frozenset):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(ann))
    return False


def _is_mapping(ann: Any) -> bool:
    origin = typing.get_origin(ann)
    if origin is dict or ann is dict:
        return True
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_mapping(a) for a in typing.get_args(ann))
    return False


def parse_value(var: str, raw: str, annotation: Any) -> Any:
    """A list key: JSON array or ``a,b,c``; a table key: JSON object; else the string."""
    text = raw.strip()
    if _is_list(annotation):
        if text.startswith("["):
            return _json(var, text)
        return [part.strip() for part in text.split(",") if part.strip()]
    if _is_mapping(annotation) and text.startswith("{"):
        return _json(var, text)
    return raw


def _json(var: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"environment: {var}: not valid JSON ({exc.msg} at {exc.pos})") from None


def overrides(
    env: Mapping[str, str],
    root: type[BaseModel] | None = None,
    data: Mapping[str, Any] | None = None,
) -> list[Override]:
    """The settings overrides among ``env`` (sorted by name; other variables are skipped).
    ``root``: the settings model (default: ``auditpipe.settings.Settings``)."""
    if root is None:
        from importlib import import_module  # not an import edge: settings imports this module

        root = import_module("auditpipe.settings").Settings
    tree = settings_tree(root, data)
    out = []
    for var in sorted(env):
        resolved = resolve(var, tree)
        if resolved is not None:
            path, leaf = resolved
            out.append(Override(var, path, parse_value(var, env[var], leaf.annotation)))
    return out


def apply_env(
    data: dict[str, Any], env: Mapping[str, str], origin: str, root: type[BaseModel]
) -> dict[str, Any]:
    """``data`` (the parsed file) with every override of ``env`` set in it, in place."""
    for o in overrides(env, root, data):
        table = data
        for i, part in enumerate(o.path[:-1]):
            sub = table.setdefault(part, {})
            if not isinstance(sub, dict):
                where = ".".join(o.path[: i + 1])
                raise ConfigError(f"{origin}: [{where}] must be a table (to apply {o.var})")
            table = sub
        table[o.path[-1]] = o.value
    return data
