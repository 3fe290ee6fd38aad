"""Agent config: load, validate and type the YAML file.

The file is shaped like the OpenTelemetry Collector's: named `probes`,
`processors` and `exporters` (ids `type` or `type/name`), wired together in
`pipelines`.  Plugins describe their settings with attrs classes; `build`
turns a YAML node into an instance, checking keys and types from the attrs
fields.  We work on composed YAML *nodes* rather than loaded Python objects so
every error can point at a file line, and so duplicate keys (which PyYAML
silently collapses) can be caught.

A field may name registered components (`metadata={"registered": "protocols"}`): a
list of their names, or a mapping from name to that component's own settings, built
from its config_class. Both are checked against `schemas[kind]` (the registry's).
"""

import math
import os
import re
import types
import typing
from collections.abc import Mapping

import attrs
import yaml

from .redaction import RedactionConfig

TOP_LEVEL = ("agent", "probes", "processors", "exporters", "pipelines", "redaction")
SECTIONS = ("probes", "processors", "exporters")
LOG_LEVELS = ("debug", "info", "warning", "error")

_NULL_TAG = "tag:yaml.org,2002:null"
_ENV = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h|d)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Ranges every duration and integer must fall in: a value beyond them is a typo or an
# attack on the config, and would overflow later (the stage, the linker, retention).
MAX_DURATION_S = 100 * 365 * 86400          # 100 years
DURATION_RANGE = "0 to 36500d (100 years)"
INT_MIN, INT_MAX = -(2 ** 63), 2 ** 63 - 1  # what SQLite, the BPF maps and C take
_WANT = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", type(None): "null"}
# Scalar resolution/construction are stateless in PyYAML, so one shared
# instance of each is enough (we only call their scalar methods).
_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


class ConfigError(Exception):
    """A config problem, located precisely enough for a user to fix it."""

    def __init__(self, file, line, key, message, allowed=None):
        # Passing everything to Exception keeps the error picklable.
        super().__init__(file, line, key, message, allowed)
        self.file, self.line, self.key, self.message = file, line, key, message
        self.allowed = list(allowed) if allowed else None

    def __str__(self):
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        return text + (f" (allowed: {', '.join(self.allowed)})" if self.allowed else "")


@attrs.define
class AgentSettings:
    block_plugins: list[str] = attrs.Factory(list)
    stats_interval: float = attrs.field(
        default=10.0, validator=attrs.validators.gt(0), metadata={"unit": "seconds"})
    log_level: str = attrs.field(default="info", validator=attrs.validators.in_(LOG_LEVELS))
    # Compile all probes' BPF C in one clang run (start-up); off: one module per probe.
    compile_together: bool = True
    # Scheduling niceness of the agent once its probes are attached (-20..19). The agent's
    # work can wait in the ring buffer, the application's cannot: on a saturated host the
    # application gets the CPU first, and what the agent cannot keep up with is dropped in
    # the kernel and counted (ringbuf_full). 0: compete as an equal.
    nice: int = attrs.field(default=10, validator=[attrs.validators.ge(-20),
                                                   attrs.validators.le(19)])


@attrs.define
class Component:
    kind: str
    type: str
    name: str
    config: object
    line: int | None


@attrs.define
class PipelineConfig:
    name: str
    probes: list[str]
    processors: list[str]
    exporters: list[str]


@attrs.define
class AgentConfig:
    path: str
    agent: AgentSettings
    probes: dict[str, Component]
    processors: dict[str, Component]
    exporters: dict[str, Component]
    pipelines: dict[str, PipelineConfig]
    redaction: RedactionConfig = attrs.Factory(RedactionConfig)


@attrs.define
class _PipelineBody:  # what a `pipelines.<name>` mapping may contain
    probes: list[str]
    exporters: list[str]
    processors: list[str] = attrs.Factory(list)


def load_config(path: str, schemas, env: Mapping[str, str] | None = None) -> AgentConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, None, "", f"cannot read config: {e}") from None
    return parse_config(text, path, schemas, env)


def parse_config(text: str, path: str, schemas, env=None) -> AgentConfig:
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigError(path, mark.line + 1 if mark else None, "",
                          f"invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:  # e.g. a reader error on bad bytes: no mark
        raise ConfigError(path, None, "", f"invalid YAML: {e}") from None
    if _is_null(root):
        root = yaml.MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(root, yaml.MappingNode):
        raise _mismatch(root, "a mapping of sections", "", path, env)

    # Sections are checked in file order, so the first error reported is the
    # first in the file; pipelines wait until every component is known.
    agent, sections, pipelines = AgentSettings(), {kind: {} for kind in SECTIONS}, (None, None)
    redaction = RedactionConfig()
    for k, v in _items(root, "", path):
        if k.value == "agent":
            agent = build(AgentSettings, v, "agent", path, env, line=_line(k))
        elif k.value in SECTIONS:
            sections[k.value] = _components(k.value, v, schemas, path, env)
        elif k.value == "pipelines":
            pipelines = (v, _line(k))
        elif k.value == "redaction":
            redaction = build(RedactionConfig, v, "redaction", path, env, line=_line(k))
        else:
            raise ConfigError(path, _line(k), k.value, "unknown top-level key", sorted(TOP_LEVEL))
    return AgentConfig(path, agent, sections["probes"], sections["processors"], sections["exporters"],
                       _pipelines(*pipelines, sections, path, env), redaction)


def build(cls: type, node, keypath: str, path: str, env, *, line: int | None = None,
          schemas=None) -> object:
    """Build one attrs instance from a mapping node (null/None means all defaults).

    `line` is where "missing key" and whole-object errors point: callers pass
    the parent key's line, which reads better than the first child's. `schemas`
    (config classes by kind and name) checks fields that name registered components.
    """
    line = line if line is not None else (_line(node) if node is not None else None)
    if _is_null(node):
        node = yaml.MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(node, yaml.MappingNode):
        raise _mismatch(node, "a mapping", keypath, path, env)
    attrs.resolve_types(cls)  # turns `from __future__ import annotations` strings into types
    fields = {a.name: a for a in attrs.fields(cls) if a.init}
    given = {}  # field name -> (value, keypath, line)
    for k, v in _items(node, keypath, path):
        sub = _join(keypath, k.value)
        a = fields.get(k.value)
        if a is None:
            raise ConfigError(path, _line(k), sub, f"unknown key {k.value!r}", sorted(fields))
        kind = a.metadata.get("registered")
        if kind is not None and schemas is not None and kind in schemas:
            value = _registered(v, a.type, schemas[kind], kind, sub, path, env)
        elif a.metadata.get("unit") == "seconds":
            value = _duration(v, a.type, sub, path, env)
        else:
            value = _convert(v, a.type, sub, path, env)
        given[a.name] = (value, sub, _line(v))
    for a in fields.values():
        if a.default is attrs.NOTHING and a.name not in given:
            raise ConfigError(path, line, _join(keypath, a.name), "required key is missing")

    _check_fields(cls, fields, given, path)
    try:
        return cls(**{fields[n].alias or n: v for n, (v, _, _) in given.items()})
    except (ValueError, TypeError) as e:  # cross-field checks, converters, __attrs_post_init__
        raise ConfigError(path, line, keypath, _message(e)) from None


def _check_fields(cls, fields, given, path):
    # Run each given field's validators on their own, so a failure names that
    # field's key and line rather than the whole component.  Validators get a
    # bare instance holding the parsed values, for those that look at siblings.
    values = {}
    for name, (value, _, _) in given.items():
        conv = fields[name].converter  # validators see converted values
        if conv is None:
            values[name] = value
        elif not isinstance(conv, attrs.Converter):  # an attrs.Converter may need the instance
            try:
                values[name] = conv(value)
            except Exception:
                pass  # __init__ will report it
    bare = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(bare, name, value)
    for name, value in values.items():
        a, (_, keypath, line) = fields[name], given[name]
        for check in getattr(a.validator, "_validators", (a.validator,) if a.validator else ()):
            try:  # (^ unpacks and_(), so an in_() failure can list its options)
                check(bare, a, value)
            except (ValueError, TypeError) as e:
                raise ConfigError(path, line, keypath, _message(e), _options(check)) from None
            except Exception:
                break  # e.g. reads a sibling the user didn't set: leave it to __init__


def _options(validator):
    opts = getattr(validator, "_original_options", getattr(validator, "options", None))
    if opts is None:
        return None
    return sorted(map(str, opts)) if isinstance(opts, (set, frozenset)) else [str(o) for o in opts]


def _message(e):
    # attrs validators raise ValueError(msg, attribute, ...): keep just the text.
    return e.args[0] if e.args and isinstance(e.args[0], str) else str(e)


def _registered(node, tp, known, kind, keypath, path, env):
    """Names of registered `kind` components: a list of names, or a mapping from name to
    the settings of that component's config_class."""
    what = kind[:-1]
    origin = typing.get_origin(tp)
    if tp is list or origin is list:
        names = _convert(node, tp, keypath, path, env)
        for i, (name, item) in enumerate(zip(names, node.value)):
            if name not in known:
                raise ConfigError(path, _line(item), f"{keypath}[{i}]",
                                  f"unknown {what} {name!r}", sorted(known))
        return names
    if tp is dict or origin is dict:
        if not isinstance(node, yaml.MappingNode):
            raise _mismatch(node, f"a mapping of {what} names", keypath, path, env)
        out = {}
        for k, v in _items(node, keypath, path):
            sub = _join(keypath, k.value)
            if k.value not in known:
                raise ConfigError(path, _line(k), sub, f"unknown {what} {k.value!r}", sorted(known))
            out[k.value] = build(known[k.value], v, sub, path, env, line=_line(k))
        return out
    raise TypeError(f"{keypath}: a registered field must be a list or a dict, not {tp!r}")


def _components(kind, node, schemas, path, env):
    known = schemas.get(kind, {})
    out = {}
    if _is_null(node):
        return out
    if not isinstance(node, yaml.MappingNode):
        raise _mismatch(node, f"a mapping of {kind[:-1]} ids", kind, path, env)
    for k, v in _items(node, kind, path):
        ctype, slash, cname = k.value.partition("/")
        keypath = f"{kind}.{k.value}"
        if ctype not in known:
            raise ConfigError(path, _line(k), keypath, f"unknown {kind[:-1]} type {ctype!r}", sorted(known))
        if slash and not cname:
            raise ConfigError(path, _line(k), keypath, "empty name after '/' (use type or type/name)")
        config = build(known[ctype], v, keypath, path, env, line=_line(k), schemas=schemas)
        out[k.value] = Component(kind, ctype, k.value, config, _line(k))
    return out


def _pipelines(node, line, sections, path, env):
    if _is_null(node) or (isinstance(node, yaml.MappingNode) and not node.value):
        raise ConfigError(path, line, "pipelines", "no pipelines: nothing would run")
    if not isinstance(node, yaml.MappingNode):
        raise _mismatch(node, "a mapping of pipelines", "pipelines", path, env)
    out = {}
    for k, v in _items(node, "pipelines", path):
        keypath = f"pipelines.{k.value}"
        body = build(_PipelineBody, v, keypath, path, env, line=_line(k))
        value_nodes = {kn.value: vn for kn, vn in v.value}  # build() proved it is a mapping
        for kind in SECTIONS:
            ids = getattr(body, kind)
            if not ids and kind != "processors":
                raise ConfigError(path, _line(value_nodes[kind]), f"{keypath}.{kind}",
                                  f"a pipeline needs at least one {kind[:-1]}")
            for i, cid in enumerate(ids):
                item = value_nodes[kind].value[i]
                if cid not in sections[kind]:
                    raise ConfigError(path, _line(item), f"{keypath}.{kind}[{i}]",
                                      f"{kind[:-1]} {cid!r} is not declared in {kind}",
                                      sorted(sections[kind]))
                if cid in ids[:i]:
                    raise ConfigError(path, _line(item), f"{keypath}.{kind}[{i}]",
                                      f"{kind[:-1]} {cid!r} is listed twice")
        out[k.value] = PipelineConfig(k.value, body.probes, body.processors, body.exporters)
    return out


def _convert(node, tp, keypath, path, env):
    """Turn a node into a value of type `tp`, or raise a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (None, typing.Any, object):
        return _plain(node, keypath, path, env)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and isinstance(node, yaml.ScalarNode) \
                and _scalar(node, keypath, path, env)[1] is None:  # null, even via ${env:X}
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(node, options[0], keypath, path, env)
        for option in options:  # first type that fits wins, e.g. int | str
            try:
                return _convert(node, option, keypath, path, env)
            except ConfigError:
                pass
        raise _mismatch(node, " or ".join(map(_want, options)), keypath, path, env)
    if attrs.has(tp):
        return build(tp, node, keypath, path, env)
    if tp is list or origin is list:
        if not isinstance(node, yaml.SequenceNode):
            raise _mismatch(node, "a list", keypath, path, env)
        item = args[0] if args else typing.Any
        return [_convert(n, item, f"{keypath}[{i}]", path, env) for i, n in enumerate(node.value)]
    if tp is dict or origin is dict:
        if not isinstance(node, yaml.MappingNode):
            raise _mismatch(node, "a mapping", keypath, path, env)
        item = args[1] if args else typing.Any
        return {k.value: _convert(v, item, _join(keypath, k.value), path, env)
                for k, v in _items(node, keypath, path)}
    if not isinstance(node, yaml.ScalarNode):
        raise _mismatch(node, _want(tp), keypath, path, env)

    text, value = _scalar(node, keypath, path, env)
    if origin is typing.Literal:
        for option in args:
            if (text == option and value is not None) if isinstance(option, str) \
                    else (type(value) is type(option) and value == option):
                return option
        raise ConfigError(path, _line(node), keypath, f"unsupported value {text!r}", [str(a) for a in args])
    if tp is str and value is not None:
        return text  # the text as written, so `name: 0123` or `yes` stays a string
    if tp is bool and isinstance(value, bool):
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int and number and isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise ConfigError(path, _line(node), keypath, f"integer {text!r} is out of range",
                              [f"{INT_MIN} to {INT_MAX}"])
        return value
    if tp is float and number:
        if abs(value) > 1e308 if isinstance(value, int) else not math.isfinite(value):
            raise ConfigError(path, _line(node), keypath, f"number {text!r} is out of range",
                              ["a finite number"])
        return float(value)
    if tp is type(None) and value is None:
        return None
    if tp in _WANT:
        raise _mismatch(node, _want(tp), keypath, path, env)
    raise TypeError(f"{keypath}: unsupported config field type {tp!r}")  # a plugin bug


def _duration(node, tp, keypath, path, env):
    # Seconds as a number, or a string with a unit ("500ms", "10s", "2m").
    if isinstance(node, yaml.ScalarNode):
        text, value = _scalar(node, keypath, path, env)
        if value is None and type(None) in typing.get_args(tp):
            return None
        seconds = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = value
        else:
            m = _DURATION.fullmatch(text.strip())
            if m and isinstance(value, str):
                seconds = float(m[1]) * _UNITS[m[2]]
        if seconds is not None:
            # Compared before float(): a 400-digit int must not overflow here either.
            if not (isinstance(seconds, int) or math.isfinite(seconds)) \
                    or not 0 <= seconds <= MAX_DURATION_S:
                raise ConfigError(path, _line(node), keypath,
                                  f"duration {text!r} is out of range", [DURATION_RANGE])
            return float(seconds)
    raise _mismatch(node, "a duration like 500ms, 10s or 2m", keypath, path, env)


def _plain(node, keypath, path, env):
    # Untyped fields: plain Python data, still with env expansion and dup-key checks.
    if isinstance(node, yaml.SequenceNode):
        return [_plain(n, f"{keypath}[{i}]", path, env) for i, n in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        return {k.value: _plain(v, _join(keypath, k.value), path, env) for k, v in _items(node, keypath, path)}
    return _scalar(node, keypath, path, env)[1]


def _scalar(node, keypath, path, env):
    """Expand ${env:...} then construct the scalar; returns (text, value)."""
    def sub(m):
        if m[1] in env:
            return env[m[1]]
        if m[2] is not None:
            return m[2]
        raise ConfigError(path, _line(node), keypath, f"environment variable {m[1]} is not set")

    text = _ENV.sub(sub, node.value)
    # An expanded value is re-read as a plain YAML scalar, so ${env:N} can be an int.
    tag = node.tag if text == node.value else _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))
    construct = yaml.SafeLoader.yaml_constructors.get(tag)
    try:
        if construct is None:
            raise ValueError(tag)
        return text, construct(_CONSTRUCTOR, yaml.ScalarNode(tag, text, node.start_mark, node.end_mark))
    except (yaml.YAMLError, ValueError):
        raise ConfigError(path, _line(node), keypath, f"cannot read {text!r} as YAML tag {tag}") from None


def _items(node, keypath, path):
    """Yield (key node, value node) pairs, rejecting duplicate and non-scalar keys."""
    seen = {}
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise ConfigError(path, _line(k), keypath, "mapping keys must be plain strings")
        if k.value in seen:
            raise ConfigError(path, _line(k), _join(keypath, k.value),
                              f"duplicate key (first defined on line {seen[k.value]})")
        seen[k.value] = _line(k)
        yield k, v


def _mismatch(node, want, keypath, path, env):
    if isinstance(node, yaml.ScalarNode):
        text, value = _scalar(node, keypath, path, env)
        got = "null" if value is None else repr(text)
    else:
        got = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
    return ConfigError(path, _line(node), keypath, f"expected {want}, got {got}")


def _want(tp):
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if list in (tp, typing.get_origin(tp)):
        return "a list"
    return _WANT.get(tp, "a mapping" if dict in (tp, typing.get_origin(tp)) or attrs.has(tp) else str(tp))


def _is_null(node):
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG)


def _line(node):
    return node.start_mark.line + 1


def _join(keypath, key):
    return f"{keypath}.{key}" if keypath else key
