"""OmniQ settings: defaults < YAML file < environment < code, each value remembering its source."""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from omniq.errors import ConfigError, redact
from omniq.models import check_queue_name

__all__ = ["KEYS", "STORES", "OmniQConfig", "env_var", "find_config_file", "parse_duration"]

STORES = ("task_queue", "result_storage", "event_storage")
ENV_PREFIX = "OMNIQ_"
# Variables the project uses for other purposes; everything else under OMNIQ_ must be a setting,
# so that a typo such as OMNIQ_RESULT_STORGE_TYPE fails loudly instead of being ignored.
ENV_IGNORED = ("OMNIQ_CONFIG",)
ENV_IGNORED_PREFIXES = ("OMNIQ_TEST_", "OMNIQ_BENCH_")
SECTIONS = (*STORES, "worker")
SECRET_MASK = "***"

# Default store files live under the home dir, one per role, so roles never share a file.
_DEFAULT_NAMES = {"task_queue": "queue", "result_storage": "results", "event_storage": "events"}


# --- durations ------------------------------------------------------------------------------

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)")
_DURATION_FULL = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)\s*(?:ms|s|m|h|d)\s*)+")


def parse_duration(text: str | float | int) -> float:
    """Seconds from a number or text such as "30", "30s", "5m", "1h30m", "500ms", "1d"."""
    if isinstance(text, bool):  # bool is an int subclass; True seconds is always a mistake
        raise ValueError(f"expected a duration, got {text!r}")
    if isinstance(text, int | float):
        return _finite(float(text), text)
    if not isinstance(text, str):
        raise ValueError(f"expected a duration, got {type(text).__name__}")
    value = text.strip().lower()
    try:
        return _finite(float(value), text)
    except ValueError:
        pass
    if not value or not _DURATION_FULL.fullmatch(value):
        raise ValueError(
            f"invalid duration {text!r}; use seconds or a number with a unit "
            "(ms, s, m, h, d), e.g. '30s', '5m', '1h30m'"
        )
    return sum(float(num) * _UNIT_SECONDS[unit] for num, unit in _DURATION_PART.findall(value))


def _finite(value: float, original: object) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite duration, got {original!r}")
    return value


# --- option table ---------------------------------------------------------------------------

Check = Callable[[Any], Any]  # returns the normalised value or raises ValueError


@dataclass(frozen=True)
class _Spec:
    kind: str  # str | int | float | duration | bool | list | dict
    default: Any = None
    optional: bool = False
    check: Check | None = None
    secret: bool = False


def _at_least(low: float) -> Check:
    def check(value: Any) -> Any:
        if value < low:
            raise ValueError(f"must be >= {low:g}, got {value!r}")
        return value

    return check


def _above(low: float) -> Check:
    def check(value: Any) -> Any:
        if value <= low:
            raise ValueError(f"must be > {low:g}, got {value!r}")
        return value

    return check


def _choice(*allowed: str, upper: bool = False) -> Check:
    def check(value: str) -> str:
        norm = value.strip().upper() if upper else value.strip().lower()
        if norm not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return norm

    return check


def _store_type(value: str) -> str:
    from omniq.registry import canonical

    try:
        return canonical(value)
    except ConfigError as exc:  # re-raised by the caller with the key and its source
        raise ValueError(str(exc)) from None


def _queue_names(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("must name at least one queue")
    return [check_queue_name(name) for name in value]


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a TCP port 1-65535, got {value}")
    return value


def _url(value: str) -> str:
    if "://" not in value:
        # Not echoed: a malformed URL is the one place redact() cannot find the password.
        raise ValueError("expected a URL such as redis://host:6379/0")
    return value


def _opt(kind: str, check: Check | None = None, *, secret: bool = False) -> _Spec:
    """An option that may stay unset (None)."""
    return _Spec(kind, None, optional=True, check=check, secret=secret)


def _store_specs(store: str) -> dict[str, _Spec]:
    options = {
        "type": _Spec("str", "sqlite", check=_store_type),
        "path": _opt("str"),
        "base_dir": _opt("str"),
        "dsn": _opt("str"),
        "url": _opt("str", _url),
        "host": _opt("str"),
        "port": _opt("int", _port),
        "db": _opt("int", _at_least(0)),
        "username": _opt("str"),
        "password": _opt("str", secret=True),
        "servers": _opt("list"),
        "prefix": _opt("str"),
        "schema": _opt("str"),
        "storage_options": _opt("dict"),
        "tls": _opt("bool"),
        "options": _opt("dict"),
    }
    return {f"{store}_{name}": spec for name, spec in options.items()}


SPECS: dict[str, _Spec] = {
    **_store_specs("task_queue"),
    **_store_specs("result_storage"),
    **_store_specs("event_storage"),
    "worker_concurrency": _Spec("int", 4, check=_at_least(1)),
    "worker_queues": _Spec("list", ["default"], check=_queue_names),
    "worker_pool": _Spec("str", "thread", check=_choice("thread", "process", "async")),
    "worker_lease_seconds": _Spec("duration", 30.0, check=_above(0)),
    "worker_shutdown_timeout": _Spec("duration", 30.0, check=_at_least(0)),
    "worker_heartbeat_seconds": _opt("duration", _above(0)),  # None: a third of the lease
    "worker_poll_interval": _Spec("duration", 1.0, check=_above(0)),
    "worker_cancel_grace": _Spec("duration", 10.0, check=_at_least(0)),
    "default_queue": _Spec("str", "default", check=check_queue_name),
    "default_retries": _Spec("int", 0, check=_at_least(0)),
    "default_retry_delay": _Spec("duration", 1.0, check=_at_least(0)),
    "default_retry_backoff": _Spec("float", 2.0, check=_at_least(1)),
    "default_retry_max_delay": _Spec("duration", 300.0, check=_at_least(0)),
    "default_timeout": _opt("duration", _above(0)),
    "default_task_ttl": _opt("duration", _above(0)),
    "result_ttl": _Spec("duration", 604800.0, optional=True, check=_above(0)),
    "event_ttl": _Spec("duration", 604800.0, optional=True, check=_above(0)),
    "event_policy": _Spec("str", "buffer", check=_choice("buffer", "strict")),
    "event_buffer_size": _Spec("int", 10_000, check=_at_least(1)),
    "event_spill_max_mb": _Spec("int", 256, check=_at_least(0)),
    "task_modules": _Spec("list", []),
    "schedules": _Spec("schedules", []),
    "embedded_worker": _Spec("str", "own", check=_choice("own", "shared", "off")),
    "allow_shell": _Spec("bool", False),
    "shell_output_limit": _Spec("int", 65536, check=_at_least(1)),
    "log_level": _Spec(
        "str", "INFO", check=_choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True)
    ),
    "log_format": _Spec("str", "text", check=_choice("text", "json")),
    "home": _opt("str"),
    "metrics_port": _opt("int", _port),
    "dashboard_host": _Spec("str", "127.0.0.1"),
    "dashboard_port": _Spec("int", 8777, check=_port),
    "dashboard_token": _opt("str", secret=True),
    "dashboard_allow_actions": _Spec("bool", False),
}
KEYS: tuple[str, ...] = tuple(SPECS)


# --- where a value came from ----------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    kind: str  # default | file | env | code
    where: str = ""  # file path, variable name or argument name
    line: int | None = None

    def short(self) -> str:
        """Compact form for `omniq config show`."""
        if self.kind == "file":
            return f"file {self.where}:{self.line}" if self.line else f"file {self.where}"
        if self.kind == "env":
            return f"env {self.where}"
        return self.kind

    def describe(self) -> str:
        """Long form for error messages."""
        if self.kind == "file":
            return f"file {self.where} line {self.line}" if self.line else f"file {self.where}"
        if self.kind == "env":
            return f"environment variable {self.where}"
        if self.kind == "code":
            return f"code argument {self.where}"
        return "defaults"


_DEFAULT = _Origin("default")


# --- coercion -------------------------------------------------------------------------------

_EXPECTED = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "duration": "a duration (seconds or e.g. '30s', '5m', '1h30m')",
    "bool": "true or false",
    "list": "a list of strings",
    "dict": "a mapping",
    "schedules": "a list of schedules (mappings with name, func, and cron or every)",
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _shown(value: Any, spec: _Spec) -> str:
    """The offending value for a message: never a secret, never a long blob."""
    if spec.secret:
        return "(hidden)"
    text = redact(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _wrong(spec: _Spec, value: Any) -> ValueError:
    null = " or null" if spec.optional else ""
    kind = type(value).__name__
    return ValueError(f"expected {_EXPECTED[spec.kind]}{null}, got {kind} {_shown(value, spec)}")


def _only(value: Any, *types: type) -> Any:
    if not isinstance(value, types):
        raise TypeError
    return value


def _str_list(value: Any) -> list[str]:
    if not all(isinstance(item, str) for item in _only(value, list, tuple)):
        raise TypeError
    return list(value)


def _str_dict(value: Any) -> dict[str, Any]:
    if not all(isinstance(key, str) for key in _only(value, Mapping)):
        raise TypeError
    return copy.deepcopy(dict(value))


# kind -> converter of a YAML/code value; TypeError means "wrong type"
_CONVERT: dict[str, Callable[[Any], Any]] = {
    "str": lambda v: _only(v, str),
    "int": lambda v: _only(v, int),
    "float": lambda v: _finite(float(_only(v, int, float)), v),
    "duration": lambda v: parse_duration(_only(v, int, float, str)),
    "bool": lambda v: _only(v, bool),
    "list": _str_list,
    "dict": _str_dict,
    "schedules": lambda v: _schedules(v),
}


def _schedules(value: Any) -> list[dict[str, Any]]:
    """Each entry checked now (bad cron, unknown timezone, ...), kept as its mapping."""
    from omniq.schedules import ScheduleError, schedule_from_mapping

    entries = _only(value, list, tuple)
    if not all(isinstance(entry, Mapping) for entry in entries):
        raise TypeError
    names = set()
    for entry in entries:
        try:
            schedule = schedule_from_mapping(dict(entry))
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
        if schedule.name in names:
            raise ValueError(f"two schedules are named {schedule.name!r}")
        names.add(schedule.name)
    return [dict(entry) for entry in entries]


def _native(spec: _Spec, value: Any) -> Any:
    """Check a YAML/code value against the field kind (text is parsed only for durations)."""
    if isinstance(value, bool) and spec.kind != "bool":  # True is an int: refuse it for numbers
        raise _wrong(spec, value)
    try:
        return _CONVERT[spec.kind](value)
    except TypeError:
        raise _wrong(spec, value) from None


def _from_text(spec: _Spec, text: str) -> Any:
    """Parse an environment variable's text into the field's native type."""
    if spec.optional and text.strip().lower() in ("", "none", "null"):
        return None
    kind = spec.kind
    if kind == "int":
        return _parse(int, text.strip(), spec)
    if kind == "float":
        return _parse(float, text.strip(), spec)
    if kind == "bool":
        return _parse_bool(text, spec)
    if kind == "list":
        return _parse_list(text, spec)
    if kind == "dict":
        return _parse_json(text, spec, dict)
    if kind == "schedules":
        return _parse_json(text, spec, list)
    return text  # str and duration are handled by _native


def _parse(convert: Callable[[str], Any], text: str, spec: _Spec) -> Any:
    try:
        return convert(text)
    except ValueError:
        raise _wrong(spec, text) from None


def _parse_bool(text: str, spec: _Spec) -> bool:
    norm = text.strip().lower()
    if norm in _TRUE or norm in _FALSE:
        return norm in _TRUE
    raise ValueError(f"expected one of {'/'.join(_TRUE + _FALSE)}, got {_shown(text, spec)}")


def _parse_list(text: str, spec: _Spec) -> Any:
    if text.strip().startswith("["):
        return _parse_json(text, spec, list)
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_json(text: str, spec: _Spec, want: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected JSON for {_EXPECTED[spec.kind]}: {exc}") from None
    if not isinstance(value, want):
        raise _wrong(spec, value)
    return value


def _coerce(key: str, value: Any, origin: _Origin) -> Any:
    """Validated value for `key`, or a ConfigError naming the key and where it came from."""
    spec = SPECS[key]
    try:
        if origin.kind == "env":
            value = _from_text(spec, value)
        if value is None:
            if spec.optional:
                return None
            raise _wrong(spec, value)
        value = _native(spec, value)
        return spec.check(value) if spec.check else value
    except ValueError as exc:
        raise ConfigError(f"invalid {key} from {origin.describe()}: {exc}") from None


def _unknown(name: str, origin: _Origin, candidates: tuple[str, ...] = KEYS) -> ConfigError:
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown setting {name!r} in {origin.describe()}{hint}")


# --- YAML -----------------------------------------------------------------------------------

Entry = tuple[str, Any, _Origin]  # flat key, raw value, where it came from


def find_config_file(env: Mapping[str, str]) -> Path | None:
    """The first config file that exists in the lookup order."""
    named = env.get("OMNIQ_CONFIG")
    if named:  # naming a file that is not there is a mistake, not a request for defaults
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"config file {named} (from environment variable OMNIQ_CONFIG) does not exist"
            )
        return path
    candidates = (
        Path("omniq.yaml"),
        Path(platformdirs.user_config_dir("omniq")) / "omniq.yaml",
        Path("/etc/omniq/omniq.yaml"),
    )
    return next((p for p in candidates if p.is_file()), None)


def _read_yaml(path: Path) -> tuple[Any, Any]:
    """(data, node) of a YAML file; the node carries line numbers for messages."""
    import yaml  # only needed when a file exists; keeps `import omniq` light

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in file {path}{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML in file {path}: {exc}") from None
    finally:
        loader.dispose()
    return data, node


def _pairs(node: Any) -> Iterator[tuple[Any, Any, int]]:
    """(key, value node, line) for each entry of a YAML mapping node."""
    for key_node, value_node in node.value:
        yield getattr(key_node, "value", None), value_node, key_node.start_mark.line + 1


def _file_entries(path: Path) -> list[Entry]:
    """Flat (key, value, origin) entries from flat keys and nested sections of a file."""
    data, node = _read_yaml(path)
    where = str(path)
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"config file {where} must hold a mapping of settings, not a value")
    entries: list[Entry] = []
    for key, value_node, line in _pairs(node):
        origin = _Origin("file", where, line)
        name = str(key)
        if name in SECTIONS:
            entries.extend(_section_entries(name, data[name], value_node, origin))
        elif name in SPECS:
            entries.append((name, data[name], origin))
        else:
            raise _unknown(name, origin, KEYS + SECTIONS)
    return _no_repeats(entries)


def _section_entries(section: str, value: Any, node: Any, origin: _Origin) -> list[Entry]:
    if value is None:  # an empty section, e.g. "worker:" with everything commented out
        return []
    if not isinstance(value, dict):
        raise ConfigError(f"section {section!r} in {origin.describe()} must be a mapping")
    entries: list[Entry] = []
    for key, _, line in _pairs(node):
        flat = f"{section}_{key}"
        here = _Origin("file", origin.where, line)
        if flat not in SPECS:
            raise _unknown(f"{section}.{key}", here, KEYS)
        entries.append((flat, value[key], here))
    return entries


def _no_repeats(entries: list[Entry]) -> list[Entry]:
    """Refuse a key given twice (duplicate, or flat and nested): which one wins is a guess."""
    seen: dict[str, _Origin] = {}
    for key, _, origin in entries:
        if key in seen:
            raise ConfigError(
                f"{key} is set twice in file {origin.where}: line {seen[key].line} and "
                f"line {origin.line}"
            )
        seen[key] = origin
    return entries


# --- environment and code -------------------------------------------------------------------


def _env_entries(env: Mapping[str, str]) -> list[Entry]:
    entries: list[Entry] = []
    for var, text in sorted(env.items()):
        if not var.startswith(ENV_PREFIX) or _env_ignored(var):
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key not in SPECS:
            raise _unknown_env(var)
        entries.append((key, text, _Origin("env", var)))
    return entries


def _env_ignored(var: str) -> bool:
    return var in ENV_IGNORED or var.startswith(ENV_IGNORED_PREFIXES)


def _unknown_env(var: str) -> ConfigError:
    close = difflib.get_close_matches(var[len(ENV_PREFIX) :].lower(), KEYS, n=1)
    hint = f"; did you mean {env_var(close[0])} ({close[0]!r})?" if close else ""
    return ConfigError(f"unknown environment variable {var}: not an OmniQ setting{hint}")


def env_var(key: str) -> str:
    """The environment variable that sets `key`."""
    return ENV_PREFIX + key.upper()


def _code_entries(values: Mapping[str, Any]) -> list[Entry]:
    entries: list[Entry] = []
    for key, value in values.items():
        origin = _Origin("code", key)
        if key not in SPECS:
            raise _unknown(key, origin)
        entries.append((key, value, origin))
    return entries


# --- the config object ----------------------------------------------------------------------


class OmniQConfig:
    """Every OmniQ setting as a flat attribute, plus where each value came from.

    `OmniQConfig(**values)` layers defaults < YAML file < environment < `values`.
    Instances are immutable; derive a changed one with `replace()`.
    """

    task_queue_type: str
    task_queue_path: str | None
    task_queue_base_dir: str | None
    task_queue_dsn: str | None
    task_queue_url: str | None
    task_queue_host: str | None
    task_queue_port: int | None
    task_queue_db: int | None
    task_queue_username: str | None
    task_queue_password: str | None
    task_queue_servers: list[str] | None
    task_queue_prefix: str | None
    task_queue_schema: str | None
    task_queue_storage_options: dict[str, Any] | None
    task_queue_tls: bool | None
    task_queue_options: dict[str, Any] | None
    result_storage_type: str
    result_storage_path: str | None
    result_storage_base_dir: str | None
    result_storage_dsn: str | None
    result_storage_url: str | None
    result_storage_host: str | None
    result_storage_port: int | None
    result_storage_db: int | None
    result_storage_username: str | None
    result_storage_password: str | None
    result_storage_servers: list[str] | None
    result_storage_prefix: str | None
    result_storage_schema: str | None
    result_storage_storage_options: dict[str, Any] | None
    result_storage_tls: bool | None
    result_storage_options: dict[str, Any] | None
    event_storage_type: str
    event_storage_path: str | None
    event_storage_base_dir: str | None
    event_storage_dsn: str | None
    event_storage_url: str | None
    event_storage_host: str | None
    event_storage_port: int | None
    event_storage_db: int | None
    event_storage_username: str | None
    event_storage_password: str | None
    event_storage_servers: list[str] | None
    event_storage_prefix: str | None
    event_storage_schema: str | None
    event_storage_storage_options: dict[str, Any] | None
    event_storage_tls: bool | None
    event_storage_options: dict[str, Any] | None
    worker_concurrency: int
    worker_queues: list[str]
    worker_pool: str
    worker_lease_seconds: float
    worker_shutdown_timeout: float
    worker_heartbeat_seconds: float | None
    worker_poll_interval: float
    worker_cancel_grace: float
    default_queue: str
    default_retries: int
    default_retry_delay: float
    default_retry_backoff: float
    default_retry_max_delay: float
    default_timeout: float | None
    default_task_ttl: float | None
    result_ttl: float | None
    event_ttl: float | None
    event_policy: str
    event_buffer_size: int
    event_spill_max_mb: int
    task_modules: list[str]
    schedules: list[dict[str, Any]]
    embedded_worker: str
    allow_shell: bool
    shell_output_limit: int
    log_level: str
    log_format: str
    home: str | None
    metrics_port: int | None
    dashboard_host: str
    dashboard_port: int
    dashboard_token: str | None
    dashboard_allow_actions: bool

    _origins: dict[str, _Origin]
    _config_file: str | None

    def __init__(self, **values: Any) -> None:
        self._build(None, env=None, use_files=True, values=values)

    @classmethod
    def load(
        cls,
        config_file: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        use_files: bool = True,
        **values: Any,
    ) -> OmniQConfig:
        """Layer defaults, a YAML file (`config_file`, else the lookup), `env` and `values`.

        `use_files=False` skips the file lookup; an explicit `config_file` is still read.
        """
        config = cls.__new__(cls)
        config._build(config_file, env=env, use_files=use_files, values=values)
        return config

    @classmethod
    def from_values(cls, **values: Any) -> OmniQConfig:
        """Defaults plus `values` only: no file, no environment (tests, embedding)."""
        return cls.load(env={}, use_files=False, **values)

    def _build(
        self,
        config_file: str | os.PathLike[str] | None,
        *,
        env: Mapping[str, str] | None,
        use_files: bool,
        values: Mapping[str, Any],
    ) -> None:
        env = os.environ if env is None else env
        path = self._locate(config_file, env, use_files)
        path = path.resolve() if path else None  # messages name the file unambiguously
        self.__dict__["_config_file"] = str(path) if path else None
        self.__dict__["_origins"] = {}
        for key, spec in SPECS.items():
            self._set(key, copy.deepcopy(spec.default), _DEFAULT)
        file_entries = _file_entries(path) if path else []
        self._apply([*file_entries, *_env_entries(env), *_code_entries(values)])

    @staticmethod
    def _locate(
        config_file: str | os.PathLike[str] | None, env: Mapping[str, str], use_files: bool
    ) -> Path | None:
        if config_file is not None:
            path = Path(config_file).expanduser()
            if not path.is_file():
                raise ConfigError(f"config file {os.fspath(config_file)} does not exist")
            return path
        return find_config_file(env) if use_files else None

    def _apply(self, entries: list[Entry]) -> None:
        for key, raw, origin in entries:  # later entries win: file, then env, then code
            self._set(key, _coerce(key, raw, origin), origin)
        self._check_together()

    def _set(self, key: str, value: Any, origin: _Origin) -> None:
        self.__dict__[key] = value
        self._origins[key] = origin

    def _check_together(self) -> None:
        """Rules that involve two settings."""
        beat, lease = self.worker_heartbeat_seconds, self.worker_lease_seconds
        if beat is not None and beat >= lease:
            origin = self._origins["worker_heartbeat_seconds"]
            raise ConfigError(
                f"invalid worker_heartbeat_seconds from {origin.describe()}: must be less than "
                f"worker_lease_seconds ({lease:g}), got {beat:g}"
            )

    def __setattr__(self, name: str, value: Any) -> None:
        # Values are validated once, on construction; assignment would bypass that.
        raise AttributeError(
            f"OmniQConfig is immutable; use config.replace({name}=...) to get a changed copy"
        )

    def replace(self, **values: Any) -> OmniQConfig:
        """A copy with `values` applied as code arguments; other values keep their sources."""
        new = copy.deepcopy(self)
        new._apply(_code_entries(values))
        return new

    # --- introspection ----------------------------------------------------------------------

    @property
    def config_file(self) -> str | None:
        """The YAML file that was read, if any."""
        return self._config_file

    @property
    def home_dir(self) -> Path:
        """The data dir: `home` (OMNIQ_HOME) or the platform's user data dir."""
        if self.home:
            return Path(self.home).expanduser()
        return Path(platformdirs.user_data_dir("omniq"))

    def source_of(self, key: str) -> str:
        """Where `key`'s value came from: default, file PATH:LINE, env OMNIQ_X or code."""
        if key not in SPECS:
            raise _unknown(key, _Origin("code", "source_of"))
        return self._origins[key].short()

    def store(self, prefix: str) -> tuple[str, dict[str, Any]]:
        """(backend type, settings without prefix or None values) for one store."""
        if prefix not in STORES:
            raise ConfigError(f"unknown store {prefix!r}; choose one of: {', '.join(STORES)}")
        kind: str = getattr(self, f"{prefix}_type")
        settings: dict[str, Any] = {}
        for key in KEYS:
            value = getattr(self, key)
            if key.startswith(prefix + "_") and key != f"{prefix}_type" and value is not None:
                settings[key[len(prefix) + 1 :]] = copy.deepcopy(value)
        settings.update(self._store_defaults(prefix, kind, settings))
        return kind, settings

    def _store_defaults(self, prefix: str, kind: str, given: Mapping[str, Any]) -> dict[str, str]:
        name = _DEFAULT_NAMES[prefix]
        if kind == "sqlite" and "path" not in given:
            return {"path": str(self.home_dir / f"{name}.db")}
        if kind == "file" and "base_dir" not in given:
            return {"base_dir": str(self.home_dir / name)}
        return {}

    def as_dict(self, mask_secrets: bool = True) -> dict[str, Any]:
        """Every flat key with its effective value (home and store defaults resolved)."""
        out = {key: copy.deepcopy(getattr(self, key)) for key in KEYS}
        out["home"] = str(self.home_dir)
        for prefix in STORES:
            _, settings = self.store(prefix)
            for option in ("path", "base_dir"):
                out[f"{prefix}_{option}"] = settings.get(option)
        if mask_secrets:
            out = {key: _mask(key, value) for key, value in out.items()}
        return out

    def __repr__(self) -> str:
        # Only what differs from the defaults, masked: reprs end up in logs and tracebacks.
        shown = self.as_dict(mask_secrets=True)
        parts = [
            f"{key}={shown[key]!r}"
            for key in KEYS
            if key.endswith("_type") or self._origins[key].kind != "default"
        ]
        return f"OmniQConfig({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OmniQConfig):
            return NotImplemented
        return all(getattr(self, key) == getattr(other, key) for key in KEYS)

    __hash__ = None  # type: ignore[assignment]  # equal configs compare by value, mutable parts


_SECRET_KEY = re.compile(r"(?i)pass|secret|token|credential|(^|_)key$")


def _mask(key: str, value: Any) -> Any:
    """Hide passwords, credentials inside URLs/DSNs and secret-looking option entries."""
    if value is None:
        return None
    if SPECS.get(key, _Spec("str")).secret or _SECRET_KEY.search(key):
        return SECRET_MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_mask("", item) for item in value]
    if isinstance(value, dict):
        return {k: _mask(str(k), v) for k, v in value.items()}
    return value
