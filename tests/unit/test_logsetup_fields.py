"""`--log-format json`: the worker's task fields are top-level JSON fields (issue 9, item 16)."""

from __future__ import annotations

import io
import json
import logging

from omniq.logsetup import TASK_FIELDS, make_handler


def test_task_fields_passed_as_extra_are_top_level_json_fields() -> None:
    stream = io.StringIO()
    handler = make_handler("json", stream)
    logger = logging.getLogger("omniq.test-task-fields")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    extra = {
        "task_id": "01a2b3c4-0000-7000-8000-000000000001",
        "func": "omniq.examples:add",
        "queue": "default",
        "attempt": 2,
        "duration": 0.002,
        "worker": "host-1-abc",
        "event": "completed",
    }
    try:
        logger.info("task %s add@default completed in 2 ms", "01a2", extra=extra)
        logger.warning("task %s lost", "01a3", extra={**extra, "duration": None, "event": "x"})
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "task 01a2 add@default completed in 2 ms"
    assert {key: first[key] for key in TASK_FIELDS} == extra
    assert list(first)[4 : 4 + len(TASK_FIELDS)] == list(TASK_FIELDS)  # a stable order
    assert isinstance(first["attempt"], int) and isinstance(first["duration"], float)
    assert "duration" not in second and second["event"] == "x"  # None is left out
