"""The issue-11 commands without stores: parsing, wording, exit codes, help with examples."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from omniq import errors
from omniq.cli import common, failed_cmd, schedule_cmd
from omniq.cli.app import build_app
from omniq.cli.exit_codes import ExitCode
from omniq.cli.inspect_cmd import describe_event, progress_text
from omniq.cli.ops_cmd import _CANCEL_OUTCOMES
from omniq.observe import duration_text, schedule_record, schedule_when
from omniq.operate import ScheduleNotFound
from omniq.schedules import Schedule, ScheduleError

NEW_COMMANDS = (["failed"], ["schedule"], ["schedule", "add"], ["schedule", "list"],
                ["schedule", "show"], ["schedule", "pause"], ["schedule", "resume"],
                ["schedule", "remove"], ["schedule", "run-now"], ["cancel"], ["logs"],
                ["retry"], ["purge"])


@pytest.mark.parametrize("words", NEW_COMMANDS, ids=" ".join)
def test_help_has_examples(words: list[str]) -> None:
    found = CliRunner().invoke(build_app(), [*words, "--help"])
    assert found.exit_code == 0, found.output
    assert "Examples:" in found.output and f"omniq {' '.join(words)}" in found.output


def test_the_new_commands_are_listed() -> None:
    found = CliRunner().invoke(build_app(), ["--help"])
    for name in ("failed", "schedule", "logs"):
        assert f"  {name} " in found.output


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.TaskStateError("a schedule named 'x' exists"), ExitCode.REFUSED),
        (ScheduleNotFound("no schedule named 'x'"), ExitCode.NOT_FOUND),
        (ScheduleError("schedule 'x': bad cron expression"), ExitCode.USAGE),
    ],
)
def test_schedule_errors_exit_codes(exc: BaseException, code: ExitCode) -> None:
    with pytest.raises(SystemExit) as caught, common.handle_errors():
        raise exc
    assert caught.value.code == code


def test_cancel_outcomes_have_distinct_names_and_documented_codes() -> None:
    assert set(_CANCEL_OUTCOMES) == {"before", "running", "finished", "requested"}
    codes = {k: v[1] for k, v in _CANCEL_OUTCOMES.items()}
    assert codes == {"before": 0, "running": 0, "finished": 5, "requested": 3}
    assert len({v[0] for v in _CANCEL_OUTCOMES.values()}) == 4


def test_progress_and_output_events_read_like_sentences() -> None:
    assert progress_text(3, 10, "resized a.png") == "3/10 (30%) resized a.png"
    assert progress_text(2.5) == "2.5"
    assert progress_text(1, 0) == "1/0"
    assert describe_event("progress", {"done": 1, "total": 4}) == "1/4 (25%)"
    assert describe_event("output", {"stream": "stderr", "text": "a\nb\n"}) == "stderr: a b"
    long = describe_event("output", {"stream": "stdout", "text": "x" * 500})
    assert len(long) == len("stdout: ") + 200 and long.endswith("…")
    assert describe_event("started", {"a": 1}) == "a=1"
    assert describe_event("progress", {"done": "?"}) == "done=?"  # not ours: as stored


def test_filters_in_words() -> None:
    assert failed_cmd.Filters().words() == ""
    words = failed_cmd.Filters("mail", 3600, "send_*").words()
    assert words == " of queue 'mail', failed in the last 1h, matching function 'send_*'"


def test_durations_as_typed() -> None:
    assert [duration_text(s) for s in (30, 300, 7200, 90, 86400, 1.5)] == [
        "30s", "5m", "2h", "90s", "1d", "1.5s"]


def test_schedule_from_the_command_line() -> None:
    made = schedule_cmd.build_schedule(
        "r", "m:f", (1,), {"a": 2}, cron="0 7 * * *", timezone="Europe/Paris", every=None,
        queue=None, catch_up="all", catch_up_limit=5, paused=False, retries=2, timeout=None)
    assert (made.queue, made.options, made.catch_up_limit) == ("default", {"retries": 2}, 5)
    assert schedule_when(made) == "0 7 * * * (Europe/Paris)"
    common_args = dict(cron=None, timezone="UTC", every=None, queue=None, catch_up="latest",
                       catch_up_limit=100, paused=False)
    with pytest.raises(ValueError, match="--cron EXPR"):
        schedule_cmd.build_schedule("r", "m:f", (), {}, **common_args)
    with pytest.raises(ValueError, match="--timezone goes with --cron"):
        schedule_cmd.build_schedule("r", "m:f", (), {}, **{**common_args, "every": 5.0,
                                                          "timezone": "Europe/Paris"})
    with pytest.raises(ScheduleError, match="name"):
        schedule_cmd.build_schedule("bad name", "m:f", (), {}, **{**common_args, "every": 5.0})


def test_schedule_record_says_next_and_last_run() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    tick = Schedule(name="t", func="m:f", every=60, created_at=start,
                    last_slot=start + timedelta(minutes=2))
    found = schedule_record(tick, now=start + timedelta(minutes=2, seconds=30))
    assert found["when"] == "every 1m"
    assert found["last_slot"] == "2030-01-01T00:02:00Z"
    assert found["next_slot"] == "2030-01-01T00:03:00Z"
    paused = schedule_record(Schedule(name="p", func="m:f", every=60, paused=True))
    assert paused["next_slot"] is None and paused["paused"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["retry"], "missing TASK_ID"),
        (["retry", "--all-failed", "0190a5c4-7b1e-7c3d-8a2b-1f2e3d4c5b6a"], "not both"),
        (["retry", "0190a5c4-7b1e-7c3d-8a2b-1f2e3d4c5b6a", "--since", "1h"], "--all-failed"),
        (["purge", "--failed", "--expired"], "run the other purges apart"),
        (["purge", "--since", "1h", "--all-queues"], "go with --failed"),
        (["schedule", "add", "x", "omniq.examples:add"], "--cron EXPR"),
        (["failed", "--since", "soon"], "soon"),
        (["enqueue", "omniq.examples:add", "--pass-result"], "--pass-result needs --after"),
        (["enqueue", "omniq.examples:add", "--after", "nope"], "not a task id"),
    ],
)
def test_mistakes_are_usage_errors(args: list[str], message: str,
                                   monkeypatch: pytest.MonkeyPatch, tmp_path: object,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from omniq.cli.app import main

    monkeypatch.setenv("OMNIQ_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == ExitCode.USAGE
    assert message in capsys.readouterr().err
