"""OmniQConfig: layering, sources, parsing, error messages and secret masking."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from omniq.config import KEYS, STORES, OmniQConfig, env_var, parse_duration
from omniq.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Isolate every test from the developer's OMNIQ_* variables and config files."""
    for var in list(os.environ):
        if var.startswith("OMNIQ_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("OMNIQ_HOME", str(tmp_path))
    # The user/system config dirs must not leak in: point the user one at tmp_path.
    monkeypatch.setattr("platformdirs.user_config_dir", lambda *a, **k: str(tmp_path / "cfg"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def raises(match: str, **kwargs: Any) -> Any:
    return pytest.raises(ConfigError, match=match, **kwargs)


# --- defaults and the seed ------------------------------------------------------------------


def test_defaults_put_sqlite_files_under_home(tmp_path: Path) -> None:
    config = OmniQConfig()
    assert config.home_dir == tmp_path
    assert config.store("task_queue") == ("sqlite", {"path": str(tmp_path / "queue.db")})
    assert config.store("result_storage") == ("sqlite", {"path": str(tmp_path / "results.db")})
    assert config.store("event_storage") == ("sqlite", {"path": str(tmp_path / "events.db")})
    assert config.worker_concurrency == 4
    assert config.worker_queues == ["default"]
    assert config.worker_lease_seconds == 30.0
    assert config.result_ttl == 604800.0
    assert config.log_level == "INFO"
    assert config.config_file is None
    assert config.source_of("worker_concurrency") == "default"
    assert config.source_of("home") == "env OMNIQ_HOME"
    assert list(tmp_path.iterdir()) == []  # config creates nothing on disk


def test_home_falls_back_to_platform_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNIQ_HOME")
    monkeypatch.setattr("platformdirs.user_data_dir", lambda name: f"/data/{name}")
    config = OmniQConfig()
    assert config.home_dir == Path("/data/omniq")
    assert config.as_dict()["result_storage_path"] == "/data/omniq/results.db"


def test_seed_constructor_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIQ_WORKER_CONCURRENCY", "9")  # env still applies to other keys
    config = OmniQConfig(
        result_storage_type="sqlite",
        event_storage_type="file",
        result_storage_path="my_app_results.db",
        event_storage_base_dir="./app_events",
    )
    assert config.store("result_storage") == ("sqlite", {"path": "my_app_results.db"})
    assert config.store("event_storage") == ("file", {"base_dir": "./app_events"})
    assert config.worker_concurrency == 9
    assert config.source_of("result_storage_path") == "code"
    assert config == OmniQConfig.load(
        result_storage_type="sqlite",
        event_storage_type="file",
        result_storage_path="my_app_results.db",
        event_storage_base_dir="./app_events",
    )


def test_file_store_default_base_dir(tmp_path: Path) -> None:
    config = OmniQConfig(event_storage_type="file")
    assert config.store("event_storage") == ("file", {"base_dir": str(tmp_path / "events")})


def test_from_values_ignores_env_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "omniq.yaml", "worker_concurrency: 7\n")
    monkeypatch.setenv("OMNIQ_LOG_LEVEL", "DEBUG")
    config = OmniQConfig.from_values(worker_pool="process")
    assert (config.worker_concurrency, config.log_level, config.worker_pool) == (
        4,
        "INFO",
        "process",
    )
    assert config.home is None and config.config_file is None
    same = OmniQConfig.load(use_files=False, env={}, worker_pool="process")
    assert same == config


# --- YAML -----------------------------------------------------------------------------------


def test_flat_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path / "omniq.yaml",
        "result_storage_type: redis\n"
        "result_storage_url: redis://localhost:6379/2\n"
        "worker_queues: [high, default]\n",
    )
    config = OmniQConfig()
    assert config.config_file == str(path)
    assert config.store("result_storage") == ("redis", {"url": "redis://localhost:6379/2"})
    assert config.worker_queues == ["high", "default"]
    assert config.source_of("result_storage_url") == f"file {path}:2"


def test_nested_yaml_mixed_with_flat(tmp_path: Path) -> None:
    path = write(
        tmp_path / "omniq.yaml",
        "task_queue:\n"
        "  type: PostgreSQL\n"
        "  dsn: postgresql://app:pw@db/omniq\n"
        "  schema: jobs\n"
        "event_storage:\n"
        "  type: nats\n"
        "  servers: [nats://a:4222, nats://b:4222]\n"
        "worker:\n"
        "  concurrency: 8\n"
        "  lease_seconds: 2m\n"
        "log_format: json\n",
    )
    config = OmniQConfig()
    assert config.store("task_queue") == (
        "postgres",
        {"dsn": "postgresql://app:pw@db/omniq", "schema": "jobs"},
    )
    assert config.event_storage_servers == ["nats://a:4222", "nats://b:4222"]
    assert config.worker_concurrency == 8
    assert config.worker_lease_seconds == 120.0
    assert config.log_format == "json"
    assert config.source_of("task_queue_schema") == f"file {path}:4"
    assert config.source_of("worker_concurrency") == f"file {path}:9"


def test_empty_file_means_no_settings(tmp_path: Path) -> None:
    write(tmp_path / "omniq.yaml", "# nothing here\n")
    assert OmniQConfig() == OmniQConfig.from_values(home=str(tmp_path))


def test_file_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cfg").mkdir()
    write(tmp_path / "cfg" / "omniq.yaml", "worker_concurrency: 3\n")
    assert OmniQConfig().worker_concurrency == 3  # user config dir
    write(tmp_path / "omniq.yaml", "worker_concurrency: 5\n")
    assert OmniQConfig().worker_concurrency == 5  # ./omniq.yaml beats the user dir
    named = write(tmp_path / "named.yaml", "worker_concurrency: 6\n")
    monkeypatch.setenv("OMNIQ_CONFIG", str(named))
    assert OmniQConfig().worker_concurrency == 6  # $OMNIQ_CONFIG beats ./omniq.yaml
    explicit = write(tmp_path / "explicit.yaml", "worker_concurrency: 7\n")
    assert OmniQConfig.load(explicit).worker_concurrency == 7  # --config beats all


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    with raises(r"config file .*nope\.yaml does not exist"):
        OmniQConfig.load(tmp_path / "nope.yaml")


def test_missing_omniq_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIQ_CONFIG", "/no/such/omniq.yaml")
    with raises(r"/no/such/omniq\.yaml \(from environment variable OMNIQ_CONFIG\) does not exist"):
        OmniQConfig()


# --- precedence -----------------------------------------------------------------------------


def test_precedence_default_yaml_env_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path / "omniq.yaml",
        "worker:\n  concurrency: 2\n  pool: process\nlog_level: debug\nallow_shell: true\n",
    )
    monkeypatch.setenv("OMNIQ_WORKER_POOL", "async")
    monkeypatch.setenv("OMNIQ_LOG_LEVEL", "warning")
    config = OmniQConfig(log_level="ERROR")
    assert config.default_retries == 0 and config.source_of("default_retries") == "default"
    assert config.worker_concurrency == 2
    assert config.source_of("worker_concurrency") == f"file {path}:2"
    assert config.allow_shell is True
    assert config.worker_pool == "async"
    assert config.source_of("worker_pool") == "env OMNIQ_WORKER_POOL"
    assert config.log_level == "ERROR" and config.source_of("log_level") == "code"


def test_replace_keeps_other_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "omniq.yaml", "worker_concurrency: 2\n")
    config = OmniQConfig()
    changed = config.replace(worker_pool="process", home=str(tmp_path / "elsewhere"))
    assert changed.worker_pool == "process" and changed.source_of("worker_pool") == "code"
    assert changed.source_of("worker_concurrency") == f"file {path}:1"
    assert changed.store("task_queue")[1]["path"] == str(tmp_path / "elsewhere" / "queue.db")
    assert config.worker_pool == "thread"  # the original is untouched
    with raises("invalid worker_concurrency from code argument worker_concurrency"):
        config.replace(worker_concurrency=0)


def test_config_is_immutable() -> None:
    config = OmniQConfig()
    with pytest.raises(AttributeError, match=r"use config\.replace\(worker_pool=\.\.\.\)"):
        config.worker_pool = "process"


# --- environment parsing --------------------------------------------------------------------


def test_env_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "OMNIQ_WORKER_QUEUES": "high, default ,low",
        "OMNIQ_TASK_MODULES": '["myapp.tasks", "myapp.jobs.*"]',
        "OMNIQ_RESULT_STORAGE_STORAGE_OPTIONS": '{"anon": false}',
        "OMNIQ_ALLOW_SHELL": "yes",
        "OMNIQ_RESULT_STORAGE_TLS": "off",
        "OMNIQ_WORKER_LEASE_SECONDS": "1h30m",
        "OMNIQ_WORKER_POLL_INTERVAL": "500ms",
        "OMNIQ_DEFAULT_RETRY_BACKOFF": "1.5",
        "OMNIQ_RESULT_TTL": "none",
        "OMNIQ_EVENT_STORAGE_PORT": "4222",
        "OMNIQ_TEST_ANYTHING": "ignored",
        "OMNIQ_BENCH_ROUNDS": "ignored",
    }
    for var, text in env.items():
        monkeypatch.setenv(var, text)
    config = OmniQConfig()
    assert config.worker_queues == ["high", "default", "low"]
    assert config.task_modules == ["myapp.tasks", "myapp.jobs.*"]
    assert config.result_storage_storage_options == {"anon": False}
    assert config.allow_shell is True
    assert config.result_storage_tls is False
    assert config.worker_lease_seconds == 5400.0
    assert config.worker_poll_interval == 0.5
    assert config.default_retry_backoff == 1.5
    assert config.result_ttl is None
    assert config.event_storage_port == 4222
    assert config.source_of("result_ttl") == "env OMNIQ_RESULT_TTL"


def test_explicit_env_mapping_replaces_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIQ_WORKER_CONCURRENCY", "9")
    config = OmniQConfig.load(env={"OMNIQ_WORKER_CONCURRENCY": "3"})
    assert config.worker_concurrency == 3


@pytest.mark.parametrize(
    ("var", "text", "message"),
    [
        (
            "OMNIQ_ALLOW_SHELL",
            "maybe",
            r"expected one of 1/true/yes/on/0/false/no/off, got 'maybe'",
        ),
        ("OMNIQ_WORKER_CONCURRENCY", "four", r"expected an integer, got str 'four'"),
        ("OMNIQ_TASK_QUEUE_OPTIONS", "[1]", r"expected a mapping or null, got list \[1\]"),
        ("OMNIQ_TASK_QUEUE_OPTIONS", "{bad", r"expected JSON for a mapping"),
        ("OMNIQ_WORKER_POOL", "fork", r"must be one of thread, process, async, got 'fork'"),
    ],
)
def test_env_bad_values(monkeypatch: pytest.MonkeyPatch, var: str, text: str, message: str) -> None:
    monkeypatch.setenv(var, text)
    key = var.removeprefix("OMNIQ_").lower()
    with raises(rf"invalid {key} from environment variable {var}: {message}"):
        OmniQConfig()


def test_unknown_env_var_suggests_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIQ_RESULT_STORGE_TYPE", "redis")
    with pytest.raises(ConfigError) as info:
        OmniQConfig()
    assert str(info.value) == (
        "unknown environment variable OMNIQ_RESULT_STORGE_TYPE: not an OmniQ setting; "
        "did you mean OMNIQ_RESULT_STORAGE_TYPE ('result_storage_type')?"
    )


def test_every_key_has_its_env_var() -> None:
    env = {env_var(key): "" for key in KEYS if key.endswith("_host")}
    assert OmniQConfig.load(env=env, use_files=False).source_of("task_queue_host") == (
        "env OMNIQ_TASK_QUEUE_HOST"
    )
    assert env_var("worker_concurrency") == "OMNIQ_WORKER_CONCURRENCY"


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        ("2.5", 2.5),
        (" 10 ", 10.0),
        (3, 3.0),
        (1.5, 1.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5 minutes", "1x", "s", "inf", True])
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(text)


def test_bad_duration_names_key_and_source(tmp_path: Path) -> None:
    path = write(tmp_path / "omniq.yaml", "worker:\n  concurrency: 2\n  lease_seconds: 5 minutes\n")
    with pytest.raises(ConfigError) as info:
        OmniQConfig()
    assert str(info.value) == (
        f"invalid worker_lease_seconds from file {path} line 3: invalid duration '5 minutes'; "
        "use seconds or a number with a unit (ms, s, m, h, d), e.g. '30s', '5m', '1h30m'"
    )


def test_duration_strings_from_code() -> None:
    config = OmniQConfig(default_timeout="2m", result_ttl=None, worker_shutdown_timeout=0)
    assert (config.default_timeout, config.result_ttl, config.worker_shutdown_timeout) == (
        120.0,
        None,
        0.0,
    )


# --- validation -----------------------------------------------------------------------------


def test_unknown_yaml_key_with_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "omniq.yaml", "log_level: INFO\n\nresult_storge_type: redis\n")
    with pytest.raises(ConfigError) as info:
        OmniQConfig()
    assert str(info.value) == (
        f"unknown setting 'result_storge_type' in file {path} line 3; "
        "did you mean 'result_storage_type'?"
    )


def test_unknown_nested_yaml_key(tmp_path: Path) -> None:
    path = write(tmp_path / "omniq.yaml", "result_storage:\n  type: redis\n  ulr: redis://x\n")
    with raises(
        rf"unknown setting 'result_storage\.ulr' in file {path} line 3; "
        r"did you mean 'result_storage_url'\?"
    ):
        OmniQConfig()


def test_unknown_code_argument() -> None:
    with raises(
        r"unknown setting 'worker_concurency' in code argument worker_concurency; "
        r"did you mean 'worker_concurrency'\?"
    ):
        OmniQConfig(worker_concurency=3)


def test_key_set_twice_in_file(tmp_path: Path) -> None:
    write(tmp_path / "omniq.yaml", "worker_concurrency: 2\nworker:\n  concurrency: 3\n")
    with raises(r"worker_concurrency is set twice in file .*: line 1 and line 3"):
        OmniQConfig()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"worker_concurrency": True}, r"expected an integer, got bool True"),
        ({"worker_concurrency": "4"}, r"expected an integer, got str '4'"),
        ({"worker_concurrency": 0}, r"must be >= 1, got 0"),
        ({"worker_queues": "default"}, r"expected a list of strings, got str 'default'"),
        ({"worker_queues": []}, r"must name at least one queue"),
        ({"default_retry_backoff": 0.5}, r"must be >= 1, got 0.5"),
        ({"worker_lease_seconds": None}, r"expected a duration .*, got NoneType None"),
        ({"result_storage_port": 70000}, r"must be a TCP port 1-65535, got 70000"),
        ({"log_level": "loud"}, r"must be one of DEBUG, INFO, WARNING, ERROR, got 'loud'"),
    ],
)
def test_wrong_types_and_values(values: dict[str, Any], message: str) -> None:
    (key,) = values
    with raises(rf"invalid {key} from code argument {key}: {message}"):
        OmniQConfig(**values)


def test_wrong_type_in_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "omniq.yaml", "worker:\n  concurrency: lots\n")
    with pytest.raises(ConfigError) as info:
        OmniQConfig()
    assert str(info.value) == (
        f"invalid worker_concurrency from file {path} line 2: expected an integer, got str 'lots'"
    )


def test_bad_backend_type(tmp_path: Path) -> None:
    path = write(tmp_path / "omniq.yaml", "event_storage:\n  type: mongo\n")
    with raises(
        rf"invalid event_storage_type from file {path} line 2: unknown backend type 'mongo'; "
        r"choose one of: memory, sqlite, file, postgres, redis, nats"
    ):
        OmniQConfig()


def test_backend_aliases_are_canonical() -> None:
    config = OmniQConfig(task_queue_type="pg", result_storage_type="postgresql")
    assert (config.task_queue_type, config.result_storage_type) == ("postgres", "postgres")


@pytest.mark.parametrize("name", ["bad queue", "-x", "a/b"])
def test_bad_queue_name(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("OMNIQ_WORKER_QUEUES", f"default,{name}")
    with raises(
        rf"invalid worker_queues from environment variable OMNIQ_WORKER_QUEUES: "
        rf"invalid queue name '{name}'"
    ):
        OmniQConfig()


def test_bad_default_queue_name() -> None:
    with raises(r"invalid default_queue from code argument default_queue: invalid queue name"):
        OmniQConfig(default_queue="no spaces please")


def test_heartbeat_must_be_shorter_than_lease() -> None:
    with raises(
        r"invalid worker_heartbeat_seconds from code argument worker_heartbeat_seconds: "
        r"must be less than worker_lease_seconds \(30\), got 30"
    ):
        OmniQConfig(worker_heartbeat_seconds="30s")


def test_malformed_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "omniq.yaml", "worker:\n  concurrency: 2\n  queues: [a, b\n")
    with raises(rf"malformed YAML in file {path} line \d+: "):
        OmniQConfig()


def test_malformed_yaml_tab(tmp_path: Path) -> None:
    path = write(tmp_path / "omniq.yaml", "log_level: INFO\n\tworker_pool: thread\n")
    with raises(rf"malformed YAML in file {path} line 2: "):
        OmniQConfig()


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    write(tmp_path / "omniq.yaml", "- a\n- b\n")
    with raises(r"must hold a mapping of settings"):
        OmniQConfig()


def test_yaml_section_must_be_a_mapping(tmp_path: Path) -> None:
    write(tmp_path / "omniq.yaml", "worker: 8\n")
    with raises(r"section 'worker' in file .* line 1 must be a mapping"):
        OmniQConfig()


def test_yaml_is_safe_loaded(tmp_path: Path) -> None:
    write(tmp_path / "omniq.yaml", "log_level: !!python/object/apply:os.getcwd []\n")
    with raises(r"malformed YAML in file .* line 1: "):
        OmniQConfig()


# --- secrets and introspection --------------------------------------------------------------


def secret_config() -> OmniQConfig:
    return OmniQConfig(
        task_queue_type="postgres",
        task_queue_dsn="postgresql://app:hunter2@db:5432/omniq",
        result_storage_type="redis",
        result_storage_url="redis://:hunter2@cache:6379/0",
        result_storage_password="hunter2",
        event_storage_type="nats",
        event_storage_servers=["nats://u:hunter2@n1:4222"],
        event_storage_storage_options={"secret": "hunter2", "anon": False},
    )


def test_as_dict_masks_secrets(tmp_path: Path) -> None:
    shown = secret_config().as_dict()
    assert "hunter2" not in repr(shown)
    assert shown["task_queue_dsn"] == "postgresql://app:***@db:5432/omniq"
    assert shown["result_storage_url"] == "redis://:***@cache:6379/0"
    assert shown["result_storage_password"] == "***"
    assert shown["event_storage_servers"] == ["nats://u:***@n1:4222"]
    assert shown["event_storage_storage_options"] == {"secret": "***", "anon": False}
    assert shown["task_queue_password"] is None
    assert shown["home"] == str(tmp_path)
    assert shown["event_storage_path"] is None  # nats: no default path
    assert set(shown) == set(KEYS)


def test_as_dict_unmasked_and_defaults_resolved(tmp_path: Path) -> None:
    plain = secret_config().as_dict(mask_secrets=False)
    assert plain["result_storage_password"] == "hunter2"
    defaults = OmniQConfig(event_storage_type="file").as_dict()
    assert defaults["task_queue_path"] == str(tmp_path / "queue.db")
    assert defaults["event_storage_base_dir"] == str(tmp_path / "events")


def test_repr_never_shows_secrets() -> None:
    text = repr(secret_config())
    assert "hunter2" not in text
    assert "result_storage_password='***'" in text
    assert "task_queue_type='postgres'" in text


def test_secret_never_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        OmniQConfig(result_storage_password=1234)
    assert "1234" not in str(info.value)
    assert "expected a string or null, got int (hidden)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        OmniQConfig(result_storage_url="redis:u:hunter2@host")
    assert str(info.value) == (
        "invalid result_storage_url from code argument result_storage_url: "
        "expected a URL such as redis://host:6379/0"
    )


def test_store_output_drops_none_and_prefix() -> None:
    config = OmniQConfig(
        result_storage_type="redis",
        result_storage_host="cache",
        result_storage_port=6380,
        result_storage_db=2,
        result_storage_prefix="app1",
        result_storage_tls=True,
        result_storage_options={"socket_timeout": 5},
    )
    kind, settings = config.store("result_storage")
    assert kind == "redis"
    assert settings == {
        "host": "cache",
        "port": 6380,
        "db": 2,
        "prefix": "app1",
        "tls": True,
        "options": {"socket_timeout": 5},
    }
    settings["options"]["socket_timeout"] = 99  # backends get a copy
    assert config.result_storage_options == {"socket_timeout": 5}
    with raises(r"unknown store 'results'; choose one of: task_queue, result_storage"):
        config.store("results")


def test_source_of_unknown_key() -> None:
    with raises(r"unknown setting 'worker_pol'.*did you mean 'worker_pool'\?"):
        OmniQConfig().source_of("worker_pol")


def test_pickle_and_copy_roundtrip() -> None:
    config = secret_config()
    for clone in (pickle.loads(pickle.dumps(config)), copy.copy(config), copy.deepcopy(config)):
        assert clone == config
        assert clone.source_of("task_queue_dsn") == "code"
        assert clone.store("event_storage") == config.store("event_storage")


# --- the example file -----------------------------------------------------------------------


def test_example_file_loads_and_documents_every_key() -> None:
    config = OmniQConfig.load(EXAMPLE, env={})
    assert config == OmniQConfig.from_values()  # the example spells out the defaults
    not_in_file = [key for key in KEYS if not config.source_of(key).startswith("file ")]
    assert not_in_file == []
    text = EXAMPLE.read_text(encoding="utf-8")
    assert [env_var(key) for key in KEYS if env_var(key) not in text] == []


def test_annotations_match_the_option_table() -> None:
    annotated = [k for k in OmniQConfig.__annotations__ if not k.startswith("_")]
    assert annotated == list(KEYS)
    assert {key.split("_type")[0] for key in KEYS if key.endswith("_type")} == set(STORES)
