"""Argument parsing of `omniq enqueue` and the operator commands, without processes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from omniq.cli import enqueue_cmd as enq
from omniq.cli.ops_cmd import purge_plan

DEP = "0190a5c4-7b1e-7c3d-8a2b-1f2e3d4c5b6a"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", 2),
        ("2.5", 2.5),
        ("-1", -1),
        ("true", True),
        ("null", None),
        ('"2"', "2"),
        ("[1, 2]", [1, 2]),
        ('{"a": [1]}', {"a": [1]}),
        ("hello", "hello"),
        ("", ""),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ('"{not json"', "{not json"),
        ("a[1,", "a[1,"),
        ("2024-01-01", "2024-01-01"),
    ],
)
def test_parse_value_is_json_or_the_text(text: str, value: object) -> None:
    assert enq.parse_value(text) == value


@pytest.mark.parametrize("text", ['{"a":', "[1,", "{not json", " [1 2]"])
def test_text_that_looks_like_json_but_is_not_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="looks like JSON but is not valid JSON") as caught:
        enq.parse_value(text, "ARG 2")
    assert "ARG 2" in str(caught.value)
    with pytest.raises(ValueError, match=r"-k a .* looks like JSON"):
        enq.parse_kwarg(f"a={text}")


def test_a_module_without_function_suggests_its_functions() -> None:
    with pytest.raises(ValueError) as caught:
        enq.check_func_shape("omniq.examples")
    message = str(caught.value)
    assert "'omniq.examples:<function>'" in message and "add, " in message
    assert "omniq:examples" not in message
    with pytest.raises(ValueError, match=r"did you mean 'omniq.examples:add'\?"):
        enq.check_func_shape("omniq.examples.add")
    with pytest.raises(ValueError) as caught:
        enq.check_func_shape("nosuchpackage.thing")
    assert "did you mean" not in str(caught.value)


def test_parse_kwarg() -> None:
    assert enq.parse_kwarg("x=3") == ("x", 3)
    assert enq.parse_kwarg("name=a=b") == ("name", "a=b")
    assert enq.parse_kwarg("flag=") == ("flag", "")
    for bad in ("novalue", "=3", "not-an-identifier=1", "2x=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            enq.parse_kwarg(bad)


def test_parse_json_wants_the_right_kind() -> None:
    assert enq.parse_json("[1, 2]", "--args-json", list) == [1, 2]
    assert enq.parse_json('{"a": 1}', "--kwargs-json", dict) == {"a": 1}
    with pytest.raises(ValueError, match="--args-json is not valid JSON"):
        enq.parse_json("[1,", "--args-json", list)
    with pytest.raises(ValueError, match="must be an array"):
        enq.parse_json('{"a": 1}', "--args-json", list)
    with pytest.raises(ValueError, match="not valid JSON"):
        enq.parse_json("[NaN]", "--args-json", list)


def test_parse_at_returns_aware_utc() -> None:
    assert enq.parse_at("2030-01-31T14:30:00Z") == datetime(2030, 1, 31, 14, 30, tzinfo=UTC)
    assert enq.parse_at("2030-01-31T14:30+02:00") == datetime(2030, 1, 31, 12, 30, tzinfo=UTC)
    naive = datetime(2030, 1, 31, 14, 30)
    local = enq.parse_at("2030-01-31T14:30")
    assert local.tzinfo is UTC and local == naive.astimezone().astimezone(UTC)
    with pytest.raises(ValueError, match="ISO 8601"):
        enq.parse_at("tomorrow")


def test_func_shape() -> None:
    assert enq.check_func_shape("pkg.mod:func") == "pkg.mod:func"
    assert enq.check_func_shape("mod:Class.method") == "mod:Class.method"
    with pytest.raises(ValueError, match=r"did you mean 'omniq\.examples:add'"):
        enq.check_func_shape("omniq.examples.add")
    for bad in ("func", "mod:", ":func", "my mod:f", "mod:f-g", "mod:f:g"):
        with pytest.raises(ValueError, match=r"package\.module:function"):
            enq.check_func_shape(bad)


def test_check_importable() -> None:
    enq.check_importable("omniq.examples:add")
    with pytest.raises(ValueError, match="unknown module 'no_such_mod_xyz'"):
        enq.check_importable("no_such_mod_xyz:f")
    with pytest.raises(ValueError, match=r"unknown module 'omniq\.nope'"):
        enq.check_importable("omniq.nope:f")
    with pytest.raises(ValueError, match="unknown function 'missing'"):
        enq.check_importable("omniq.examples:missing")
    with pytest.raises(ValueError, match="is not callable"):
        enq.check_importable("omniq:__version__")


def test_python_spec_combines_args_and_kwargs() -> None:
    spec = enq.python_spec(
        "omniq.examples:echo", ["1", "x"], ["a=2"], '["j"]', '{"a": 1, "b": 1}', {"queue": "q"}
    )
    assert spec.args == (1, "x", "j")
    assert spec.kwargs == {"a": 2, "b": 1}  # -k wins over --kwargs-json
    assert spec.options == {"queue": "q"} and not spec.shell


def test_one_spec_shell_forms() -> None:
    argv = enq.one_spec("ls", ["-l", "/tmp"], [], None, None, True, None, {})
    assert argv.shell and argv.args == ("ls", "-l", "/tmp") and argv.func == enq.SHELL_FUNC
    sh = enq.one_spec(None, [], [], None, None, False, "echo $HOME", {})
    assert sh.shell and sh.kwargs == {"sh": "echo $HOME"} and sh.args == ()
    with pytest.raises(ValueError, match="not both"):
        enq.one_spec("ls", [], [], None, None, True, "ls", {})
    with pytest.raises(ValueError, match="no -k"):
        enq.one_spec("ls", [], ["a=1"], None, None, True, None, {})
    with pytest.raises(ValueError, match="needs a command"):
        enq.one_spec(None, [], [], None, None, True, None, {})
    with pytest.raises(ValueError, match="missing FUNC"):
        enq.one_spec(None, [], [], None, None, False, None, {})


def test_task_options_keep_only_what_was_given() -> None:
    assert enq.task_options(None, None, None, 0, None, None, None, None) == {}
    options = enq.task_options("mail", 30.0, None, 5, 2, 10.0, 60.0, "k")
    assert options == {
        "queue": "mail",
        "delay": 30.0,
        "priority": 5,
        "retries": 2,
        "timeout": 10.0,
        "ttl": 60.0,
        "unique_key": "k",
    }
    at = enq.task_options(None, None, "2030-01-01T00:00Z", 0, None, None, None, None)
    assert at == {"eta": datetime(2030, 1, 1, tzinfo=UTC)}
    with pytest.raises(ValueError, match="not both"):
        enq.task_options(None, 1.0, "2030-01-01T00:00Z", 0, None, None, None, None)


def test_positive_duration() -> None:
    assert enq.positive_duration("1m") == 60
    for bad in ("0", "0s", "-5"):
        with pytest.raises(ValueError):
            enq.positive_duration(bad)


def line(**fields: object) -> str:
    return json.dumps(fields)


def test_spec_from_line() -> None:
    defaults = {"queue": "default-q", "priority": 1}
    spec = enq.spec_from_line(
        line(func="m:f", args=[1], kwargs={"a": 2}, queue="q", delay="5m", retries=2, key="k"),
        defaults,
    )
    assert (spec.func, spec.args, spec.kwargs) == ("m:f", (1,), {"a": 2})
    assert spec.options == {
        "queue": "q",
        "priority": 1,
        "delay": 300.0,
        "retries": 2,
        "unique_key": "k",
    }
    shell = enq.spec_from_line(line(shell=["echo", "hi"], timeout=5), {})
    assert shell.shell and shell.args == ("echo", "hi") and shell.options == {"timeout": 5.0}
    assert enq.spec_from_line(line(sh="ls | wc -l"), {}).kwargs == {"sh": "ls | wc -l"}
    at = enq.spec_from_line(line(func="m:f", at="2030-01-01T00:00:00Z"), {})
    assert at.options["eta"] == datetime(2030, 1, 1, tzinfo=UTC)


def test_lines_take_every_option_of_the_python_api() -> None:
    from dataclasses import fields

    from omniq.client import TaskOptions

    values = {
        "queue": "q",
        "delay": "5m",
        "priority": 3,
        "retries": 2,
        "retry_delay": "10s",
        "timeout": 30,
        "ttl": "1h",
        "result_ttl": "2d",
        "unique_key": "k",
        "unique_ttl": "1d",
        "after": [DEP],
        "pass_result": True,
    }
    spec = enq.spec_from_line(line(func="m:f", **values), {})
    assert set(spec.options) == {f.name for f in fields(TaskOptions)} - {"eta"}
    assert spec.options["retry_delay"] == 10.0 and spec.options["result_ttl"] == 172800.0
    assert spec.options["unique_ttl"] == 86400.0
    assert spec.options["after"] == (DEP,) and spec.options["pass_result"] is True
    TaskOptions(**spec.options)  # every name is a real option
    eta = enq.spec_from_line(line(func="m:f", eta="2030-01-01T00:00:00Z", key="k", key_ttl=0), {})
    assert eta.options["eta"] == datetime(2030, 1, 1, tzinfo=UTC)
    assert eta.options["unique_key"] == "k" and eta.options["unique_ttl"] == 0
    with pytest.raises(ValueError, match="'key', 'unique_key', not both"):
        enq.spec_from_line(line(func="m:f", key="a", unique_key="b"), {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[1]", "expected a JSON object"),
        (line(func="m:f", colour="red"), "unknown field(s) 'colour'"),
        (line(args=[1]), 'needs "func"'),
        (line(func="nocolon"), "package.module:function"),
        (line(func="m:f", args={"a": 1}), '"args" must be a JSON array'),
        (line(func="m:f", kwargs=[1]), '"kwargs" must be a JSON object'),
        (line(func="m:f", queue="a b"), "invalid queue name"),
        (line(func="m:f", delay="soon"), "invalid duration"),
        (line(func="m:f", priority="high"), '"priority" must be an integer'),
        (line(func="m:f", priority=True), '"priority" must be an integer'),
        (line(func="m:f", retries=-1), "cannot be negative"),
        (line(func="m:f", timeout=0), "more than zero"),
        (line(func="m:f", result_ttl=0), "more than zero"),
        (line(func="m:f", retry_delay="later"), "invalid duration"),
        (line(func="m:f", delay=1, at="2030-01-01T00:00Z"), "not both"),
        (line(shell=["ls"], sh="ls"), "not both"),
        (line(shell="ls"), "array of strings"),
        (line(sh=["ls"]), '"sh" must be a string'),
        (line(shell=["ls"], func="m:f"), 'not "func"'),
        (line(shell=[]), "needs a command"),
    ],
)
def test_bad_lines(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        enq.spec_from_line(text, {})
    assert message in str(caught.value)


def test_read_specs_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"func": "m:f"}\n\n# comment\n{"func": 3}\n')
    with pytest.raises(ValueError, match=r"t.jsonl line 4: needs \"func\""):
        enq.read_specs(str(path), {})
    path.write_text('{"func": "m:f"}\n  \n{"func": "m:g", "args": [1]}\n')
    assert [s.func for s in enq.read_specs(str(path), {})] == ["m:f", "m:g"]
    with pytest.raises(ValueError, match="cannot read"):
        enq.read_specs(str(path) + ".missing", {})


def test_purge_plan() -> None:
    plan = purge_plan(7 * 86400, 3600, True, "mail", False)
    assert plan == [
        "results finished more than 7d ago",
        "results past their TTL",
        "events older than 1h",
        "every waiting and failed task of queue 'mail'",
    ]
    assert purge_plan(None, 90, False, None, True)[0] == "events older than 90s"
    with pytest.raises(ValueError, match="nothing to purge"):
        purge_plan(None, None, False, None, False)
    with pytest.raises(ValueError, match="not both"):
        purge_plan(None, None, False, "q", True)


def test_after_takes_one_id_or_a_list_and_pass_result_a_boolean() -> None:
    one = enq.spec_from_line(line(func="m:f", after=DEP.upper()), {})
    assert one.options["after"] == (DEP,)
    for bad, message in ((["nope"], "not a task id"), ([], "task id or a list"),
                         (3, "task id or a list")):
        with pytest.raises(ValueError, match=message):
            enq.spec_from_line(line(func="m:f", after=bad), {})
    with pytest.raises(ValueError, match="true or false"):
        enq.spec_from_line(line(func="m:f", after=[DEP], pass_result=1), {})
    with pytest.raises(ValueError, match='"priority" must be an integer'):
        enq.spec_from_line(line(func="m:f", priority=True), {})


def test_after_and_pass_result_options() -> None:
    assert enq.task_options(after=(DEP,), pass_result=True) == {
        "after": (DEP,), "pass_result": True}
    assert enq.task_options() == {}
    with pytest.raises(ValueError, match="--pass-result needs --after"):
        enq.task_options(pass_result=True)
