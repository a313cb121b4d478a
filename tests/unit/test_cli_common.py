"""The shared CLI plumbing: error handler, global options, validators, output helpers."""

from __future__ import annotations

import inspect
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer

from omniq import errors
from omniq.cli import common, console
from omniq.cli.exit_codes import ExitCode
from omniq.cli.inspect_cmd import format_details, validate_types


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "STATE", common.State())


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.ConfigError("invalid worker_concurrency"), ExitCode.CONFIG),
        (errors.BackendUnavailable("redis down"), ExitCode.UNAVAILABLE),
        (errors.MissingDependency("pip install 'omniq[redis]'"), ExitCode.UNAVAILABLE),
        (errors.TaskNotFound("no task"), ExitCode.NOT_FOUND),
        (errors.ResultTimeout("no result"), ExitCode.PENDING),
        (errors.TaskFailed("id", "failed", "RuntimeError", "boom"), ExitCode.TASK_FAILED),
        (errors.TaskTimeout("id", "timeout", "TimeoutError", "slow"), ExitCode.TASK_FAILED),
        (errors.SerializationError("argument 0"), ExitCode.USAGE),
        (ValueError("bad value"), ExitCode.USAGE),
        (errors.OmniQError("other"), ExitCode.TASK_FAILED),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
        (RuntimeError("a bug"), ExitCode.TASK_FAILED),
    ],
)
def test_handle_errors_maps_exceptions_to_exit_codes(
    exc: BaseException, code: ExitCode, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught, common.handle_errors():
        raise exc
    assert caught.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_messages_keep_the_install_hint_and_hide_passwords(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit), common.handle_errors():
        raise errors.MissingDependency("the redis backend needs it: pip install 'omniq[redis]'")
    assert "pip install 'omniq[redis]'" in capsys.readouterr().err
    with pytest.raises(SystemExit), common.handle_errors():
        raise errors.BackendUnavailable("cannot reach redis://user:hunter2@host:6379/0")
    err = capsys.readouterr().err
    assert "hunter2" not in err and "redis://user:***@host" in err


def test_unexpected_errors_point_to_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit), common.handle_errors():
        raise KeyError("x")
    assert "run with -v for the traceback" in capsys.readouterr().err
    common.STATE.verbose = True
    with pytest.raises(SystemExit), common.handle_errors():
        raise KeyError("x")
    assert "Traceback" in capsys.readouterr().err


def test_handle_errors_lets_exits_through() -> None:
    with pytest.raises(SystemExit) as caught, common.handle_errors():
        raise SystemExit(3)
    assert caught.value.code == 3


def test_with_global_options_adds_config_and_verbose() -> None:
    seen: dict[str, Any] = {}

    def command(name: str, count: int = 1) -> None:
        seen.update(name=name, count=count)

    wrapped = common.with_global_options(command)
    params = inspect.signature(wrapped).parameters
    assert list(params) == ["name", "count", "omniq_config", "omniq_verbose"]
    wrapped(name="a", count=2, omniq_config="x.yaml", omniq_verbose=False)
    assert seen == {"name": "a", "count": 2}
    assert common.State(config_path="x.yaml", verbose=False) == common.STATE


def test_with_global_options_keeps_a_command_s_own_parameters() -> None:
    def command(verbose: bool = False) -> bool:
        return verbose

    wrapped = common.with_global_options(command)
    assert list(inspect.signature(wrapped).parameters) == ["verbose", "omniq_config"]
    assert wrapped(verbose=True, omniq_config=None) is True


def test_load_config_uses_the_config_option_and_drops_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("OMNIQ_")]:
        monkeypatch.delenv(var)
    path = tmp_path / "c.yaml"
    path.write_text("worker_concurrency: 7\n")
    common.remember(str(path), False)
    config = common.load_config(None, worker_pool=None, default_queue="q")
    assert config.worker_concurrency == 7 and config.default_queue == "q"
    assert config.worker_pool == "thread"
    assert config.source_of("default_queue") == "code"


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("0", 0.0)]
)
def test_duration(text: str, seconds: float) -> None:
    assert common.duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "-1", "1x", "nan"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        common.duration(text)


def test_task_id_and_queue_validation() -> None:
    good = "0190a5c4-7b1e-7c3d-8a2b-1f2e3d4c5b6a"
    assert common.validate_task_id(good.upper()) == good
    assert common.validate_task_id(None) is None
    with pytest.raises(typer.BadParameter, match="is not a task id"):
        common.validate_task_id("0190a5c4")
    assert common.validate_queue(["a", "b.c-d_e"]) == ["a", "b.c-d_e"]
    for bad in ("a/b", "", "-x", "x" * 101, "sp ace"):
        with pytest.raises(typer.BadParameter, match="invalid queue name"):
            common.validate_queue(bad)


def test_event_types_are_case_insensitive() -> None:
    assert validate_types(["FAILED", "timeout"]) == ["failed", "timeout"]
    assert validate_types(None) is None
    with pytest.raises(typer.BadParameter, match="choose from enqueued"):
        validate_types(["finished"])


def test_output_helpers() -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert console.iso(moment) == "2030-01-02T03:04:05.678Z"
    assert console.iso(None) == "-"
    assert console.ago(moment - timedelta(seconds=90), now=moment) == "1m ago"
    assert console.ago(moment, now=moment) == "0s ago"
    assert format_details({"func": "m:f", "n": 2, "err": "two\nlines"}) == (
        "func=m:f n=2 err=two lines"
    )
    assert common.examples("a", "b") == "\b\nExamples:\n  a\n  b"


def test_plain_table_is_tab_separated(capsys: pytest.CaptureFixture[str]) -> None:
    console.table(["A", "B"], [["1", "x y"], ["2", "z"]])
    assert capsys.readouterr().out == "1\tx y\n2\tz\n"


def test_option_values_are_converted_without_pydantic() -> None:
    from omniq.cli.app import _convert

    class Info:
        parser = None
        min: int | None = 0
        max: int | None = None

    assert _convert("3", int, Info()) == 3
    assert _convert("2.5", float, Info()) == 2.5
    assert _convert("yes", bool, Info()) is True
    assert _convert("a", list[str], Info()) == "a"
    with pytest.raises(ValueError, match="'x' is not a valid integer"):
        _convert("x", int, Info())
    with pytest.raises(ValueError, match="not in the range x>=0"):
        _convert("-1", int, Info())
    parsed = Info()
    parsed.parser = common.duration  # type: ignore[assignment]
    assert _convert("5m", float, parsed) == 300.0
    with pytest.raises(ValueError, match="invalid duration"):
        _convert("5 minutes", float, parsed)
