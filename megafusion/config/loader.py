"""Load a `Config` from a YAML file plus `section.key=value` overrides.

The YAML file's top-level keys are section names (parallel, model, train, data,
logging); each section maps keys to values. Overrides from the command line use
the same names with a dot (`parallel.tp=2`) and win over the file. Every value,
from YAML or the command line, is coerced to its field's declared type.

A file is refused, in one line naming it, when it is not UTF-8 (the byte and its line), not
YAML, empty (no sections), or gives one key twice in a mapping (PyYAML would keep the last
silently; the key and both lines are named).
"""

import difflib
import os

import yaml

from .schema import Config, ConfigError, alternatives, dict_forms, field_types, section_classes, split_optional

# Spellings accepted as "no value" for Optional fields. YAML already maps
# null/~ to None; "none" is added because people type it on the command line.
_NULL_WORDS = {"null", "none", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives ``key`` twice: first on line ``first``, again on line ``line`` (1-based)."""

    def __init__(self, key, first: int, line: int):
        super().__init__(f"key {key!r} is given twice (lines {first} and {line})")
        self.key, self.first, self.line = key, first, line


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error."""


def _mapping_without_duplicates(loader, node):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise DuplicateKeyError(key, seen[key], line)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        seen[key] = line
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def strict_yaml(text: str):
    """``yaml.safe_load(text)``, refusing a key given twice in a mapping (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def _type_name(tp) -> str:
    _, optional = split_optional(tp)
    names = " or ".join(a.__name__ for a in alternatives(tp))
    return f"{names} or null" if optional else names


def _unknown(kind: str, name: str, valid: list[str], prefix: str = "") -> ConfigError:
    """Error for an unknown section/key, suggesting the closest valid spelling."""
    msg = f"unknown {kind} '{prefix}{name}'"
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        msg += f" (did you mean '{prefix}{close[0]}'?)"
    where = f" of section '{prefix[:-1]}'" if prefix else ""
    return ConfigError(f"{msg}; valid {kind}s{where}: {', '.join(valid)}")


def coerce(value, tp, key: str):
    """Convert `value` to the declared type `tp`, or raise ConfigError naming `key`."""
    base, optional = split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NULL_WORDS):
        if optional:
            return None
        raise ConfigError(f"{key}: got null, expected {_type_name(tp)}")

    bad = ConfigError(f"{key}: cannot use {value!r} (a {type(value).__name__}), expected {_type_name(tp)}")
    if base is not dict and dict in alternatives(tp) and isinstance(value, dict):
        return {str(k): v for k, v in value.items()}  # a str | dict field given its mapping form
    # bool is checked first and excluded below because bool is a subclass of int:
    # `parallel.tp=true` must not silently become tp=1.
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise bad
    if base is dict:
        # A mapping (YAML, or `section.key={a: 1, b: 2}` on the command line); its keys are
        # checked by validate(), which knows what each dict field may hold.
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        forms = dict_forms()
        raise ConfigError(f"{bad}: write it as {forms[key]}") if key in forms else bad
    if base is list:
        # A sequence (YAML, or `section.key=[...]` on the command line); validate() checks its items.
        if isinstance(value, list):
            return list(value)
        raise bad
    if isinstance(value, bool):
        raise bad
    if base is int:
        if isinstance(value, int):
            return value
        try:
            # float() first so "1e3" and 1000.0 are accepted; fractions are not.
            f = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            raise bad from None
        if f is not None and f.is_integer():
            return int(f)
        raise bad
    if base is float:
        # yaml.safe_load("3e-4") is the *string* "3e-4" (YAML 1.1 floats need a
        # dot), so strings are converted explicitly here.
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)
        raise bad
    raise bad  # a field type this loader does not know; keep it loud


def _set(cfg: Config, section: str, key: str, value, prefix_err: str = "") -> None:
    """Coerce and assign cfg.<section>.<key> = value, checking both names."""
    sections = section_classes()
    if section not in sections:
        raise ConfigError(prefix_err + str(_unknown("section", section, list(sections))))
    types = field_types(sections[section])
    if key not in types:
        raise ConfigError(prefix_err + str(_unknown("key", key, list(types), f"{section}.")))
    try:
        setattr(getattr(cfg, section), key, coerce(value, types[key], f"{section}.{key}"))
    except ConfigError as e:
        raise ConfigError(prefix_err + str(e)) from None


def config_from_dict(data: dict | None, source: str = "<dict>") -> Config:
    """Build a Config from {section: {key: value}}; `source` names it in errors."""
    cfg = Config()
    if data is None:  # an empty YAML file means all defaults
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    where = f"{source}: "
    sections = section_classes()
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(where + str(_unknown("section", str(section), list(sections))))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}section '{section}' must be a mapping, got {values!r}")
        for key, value in values.items():
            _set(cfg, section, str(key), value, where)
    return cfg


def _parse_value(raw: str, tp):
    """Parse a command-line value string with YAML, before type coercion."""
    base, optional = split_optional(tp)
    if base is str:
        # Keep strings verbatim: YAML would turn `out_dir=0123` into an int
        # (octal, even) and `out_dir=on` into a bool.
        if raw.strip().lower() in _NULL_WORDS:
            # "none" is a choice of some string keys (train.recompute=none): null only where allowed.
            return None if optional else raw
        # A str | dict field given its mapping form (`data.domains={shapes: 1}`): read as YAML below.
        if not (dict in alternatives(tp) and raw.lstrip().startswith("{")):
            try:
                parsed = yaml.safe_load(raw)
            except yaml.YAMLError:
                return raw
            return parsed if isinstance(parsed, str) else raw
    try:
        return strict_yaml(raw)
    except DuplicateKeyError:
        raise  # apply_overrides names the override
    except yaml.YAMLError:
        return raw  # let coerce() report it with the expected type


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings to cfg in place (and return it)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' has no '=': write it as section.key=value, e.g. parallel.tp=2")
        name, raw = item.split("=", 1)
        name = name.strip()
        if name.count(".") != 1:
            raise ConfigError(
                f"override key '{name}' must be section.key (one dot), e.g. parallel.tp; "
                f"sections: {', '.join(section_classes())}"
            )
        section, key = name.split(".")
        sections = section_classes()
        types = field_types(sections[section]) if section in sections else {}
        # Unknown names keep the raw string; _set reports them.
        try:
            value = _parse_value(raw, types[key]) if key in types else raw
        except DuplicateKeyError as err:
            raise ConfigError(f"override '{item}': key {err.key!r} is given twice: keep one") from None
        _set(cfg, section, key, value)
    return cfg


def load_config(path: str | list[str] | None, overrides: list[str] | None = None) -> Config:
    """Read `path` (YAML; a list: several files, each later one overriding the earlier ones key by
    key; None = defaults only), then apply `overrides`.

    The result is not validated: call validate(cfg, world_size) once the world
    size is known.
    """
    paths = [path] if isinstance(path, str) else list(path or [])
    data = None
    for one in paths:
        data = _merged(data, read_config_file(one))
    cfg = config_from_dict(
        data, source=f"config file{'s' if len(paths) > 1 else ''} {', '.join(repr(p) for p in paths)}"
    )
    return apply_overrides(cfg, list(overrides or []))


def read_config_file(path: str):
    """The YAML document of config file ``path``; ConfigError, in one line naming the file, when it is
    missing, unreadable, not UTF-8, not YAML, empty, or gives a key twice."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text: byte 0x{raw[err.start]:02x} at position {err.start} "
            f"(line {line}) cannot be decoded: save the file as UTF-8"
        ) from None
    try:
        layer = strict_yaml(text)
    except DuplicateKeyError as err:
        raise ConfigError(
            f"config file '{path}' line {err.line}: key {err.key!r} is given twice (first on line {err.first}; "
            "YAML would keep only the last): keep one"
        ) from None
    except yaml.YAMLError as err:
        # One line: where, and what the parser was doing (its own message spans several lines).
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"config file '{path}' is not valid YAML{at}: {context + ', ' if context else ''}{problem}"
        ) from None
    if layer is None or layer == {}:
        what = "an empty mapping {}" if layer == {} else "no settings"
        raise ConfigError(
            f"config file '{path}' holds {what}: give the sections to set (parallel, model, train, data, ...; "
            "examples/configs/ has complete ones)"
        )
    return layer


def _merged(base, layer):
    """``layer`` over ``base``: sections merge key by key; anything else (``layer`` not a mapping,
    e.g. a malformed file) replaces, and ``config_from_dict`` reports what is wrong with it."""
    if isinstance(base, dict) and isinstance(layer, dict):
        out = dict(base)
        for key, value in layer.items():
            out[key] = _merged(base.get(key), value) if isinstance(value, dict) and key in base else value
        return out
    return layer if layer is not None else base


def parse_cli(argv: list[str]) -> tuple[str | list[str] | None, list[str]]:
    """Split argv into (config path(s) or None, list of key=value overrides).

    Accepts `--config FILE`, `--config=FILE` (repeatable: later files override earlier ones key
    by key, e.g. a run config and the model section `convert hf-to-mf --config-out` wrote) and
    bare `section.key=value` tokens; anything else raises ConfigError naming it.
    """
    paths: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file name: --config FILE")
            paths.append(argv[i + 1])
            i += 2
            continue
        if tok.startswith("--config="):
            paths.append(tok.split("=", 1)[1])
            if not paths[-1]:
                raise ConfigError("--config= needs a file name: --config=FILE")
        elif "=" in tok and not tok.startswith("-"):
            overrides.append(tok)
        else:
            raise ConfigError(f"unexpected argument '{tok}': expected --config FILE or section.key=value overrides")
        i += 1
    return (paths[0] if len(paths) == 1 else paths or None), overrides
