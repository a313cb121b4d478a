"""The shared CLI plumbing: error handler, global options, validators, output helpers."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest

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
        (common.Refused("not cancelled: it has started"), ExitCode.REFUSED),
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


def test_every_command_takes_the_global_options_and_records_them() -> None:
    seen: dict[str, Any] = {}

    @common.command("probe")
    @click.option("--count", type=int, default=1)
    def probe(count: int) -> int:
        seen.update(count=count)
        return 7

    code = probe.main(["--count", "2", "--config", "x.yaml"], standalone_mode=False)
    assert code == 7 and seen == {"count": 2}
    assert common.State(config_path="x.yaml", verbose=False) == common.STATE


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
    assert common.TASK_ID.convert(good.upper(), None, None) == good
    with pytest.raises(click.BadParameter, match="is not a task id"):
        common.TASK_ID.convert("0190a5c4", None, None)
    assert common.QUEUE.convert("b.c-d_e", None, None) == "b.c-d_e"
    for bad in ("a/b", "", "-x", "x" * 101, "sp ace"):
        with pytest.raises(click.BadParameter, match="invalid queue name"):
            common.QUEUE.convert(bad, None, None)


def test_event_types_are_case_insensitive() -> None:
    assert validate_types(["FAILED", "timeout"]) == ["failed", "timeout"]
    assert validate_types(None) is None
    with pytest.raises(click.BadParameter, match="choose from enqueued"):
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


def test_the_cli_is_plain_click() -> None:
    """No typer (it patched nothing public) and no pydantic on a command's path."""
    import subprocess
    import sys

    code = (
        "import sys; from omniq.cli import app, enqueue_cmd, worker_cmd, inspect_cmd, ops_cmd, "
        "config_cmd; app.build_app(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('typer', 'pydantic')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
