"""`import omniq` and `omniq --help` load no web framework and no metrics library, even
where omniq[web] is installed; only the commands that serve them do."""

from __future__ import annotations

import ast
import subprocess
import sys

HEAVY = ("prometheus_client", "aiohttp", "starlette", "uvicorn", "playwright")

CODE = """
import sys, contextlib, io
import omniq
from omniq.cli import app
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    app.main(["--help"])
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    app.main(["{command}", "--help"])
print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))
"""


def loaded_by(command: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", CODE.format(command=command, heavy=HEAVY)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    found: list[str] = ast.literal_eval(out.stdout.strip())
    return found


def test_help_of_every_observing_command_stays_light() -> None:
    for command in ("worker", "metrics", "top", "dashboard"):
        assert loaded_by(command) == [], command
