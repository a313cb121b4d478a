"""`omniq top` on a real terminal (tmux: send-keys and capture-pane), and piped."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.conftest import CLI, run_omniq, start_omniq
from tests.acceptance.observing import (
    Place,
    artifacts,
    place,
    require_tool,
    sqlite_place,
    stop,
    wait_until,
)

__all__ = ["place", "sqlite_place"]  # fixtures, imported for the tests below

COLUMNS, LINES = 150, 42


class Tmux:
    """A tmux server of our own (its own socket): nothing of the user's is touched."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.socket = f"omniq-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        out = subprocess.run([self.binary, "-L", self.socket, *args], capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout

    def screen(self, escapes: bool = False) -> str:
        return self("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top")

    def close(self) -> None:
        subprocess.run([self.binary, "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=10)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux(require_tool("tmux", "tmux"))
    try:
        yield server
    finally:
        server.close()


def start_top(tmux: Tmux, place: Place, tmp_path: Path) -> None:
    script = tmp_path / "top.sh"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in place.env.items())
    command = " ".join(shlex.quote(part) for part in [*CLI, "top"])
    # COLUMNS/LINES of the test's own terminal would override the pane's size.
    script.write_text(f"{exports}unset COLUMNS LINES\ncd {shlex.quote(str(tmp_path))}\n{command}\n"
                      "echo TOP-EXIT=$?\nsleep 30\n")
    tmux("new-session", "-d", "-s", "top", "-x", str(COLUMNS), "-y", str(LINES),
         f"bash {shlex.quote(str(script))}")


def row_of(screen: str, first: str) -> list[str]:
    """The cells of the first table row that starts with `first`."""
    rows = (line.split() for line in screen.splitlines())
    return next((row for row in rows if row and row[0] == first), [])


def test_top_refreshes_and_quits_on_q(tmux: Tmux, place: Place, tmp_path: Path) -> None:
    place.api.enqueue("omniq.examples:add", 1, 2)
    place.api.enqueue("omniq.examples:fail")
    start_top(tmux, place, tmp_path)
    screen = wait_until(lambda: "default" in tmux.screen() and tmux.screen(),
                        what="the first screen")
    assert "OmniQ top" in screen and "q quits" in screen
    assert "no live workers" in screen
    assert row_of(screen, "default")[:5] == ["default", "2", "0", "0", "0"]
    code, _, err = run_omniq(["enqueue", "omniq.examples:add", "3", "4"], place.env)
    assert code == 0, err
    wait_until(lambda: row_of(tmux.screen(), "default")[1] == "3", what="a refresh",
               show=tmux.screen)
    code, _, err = run_omniq(["worker", "--burst"], place.env)
    assert code == 0, err
    screen = wait_until(lambda: "fails on purpose" in tmux.screen() and tmux.screen(),
                        what="the failure", show=tmux.screen)
    assert "omniq.examples:fail" in screen
    # A live worker with both slots busy shows up within a refresh or two.
    worker = start_omniq(["worker", "-c", "2", "--shutdown-timeout", "0"], place.env)
    try:
        for _ in range(2):
            place.api.enqueue("omniq.examples:sleep", 3)
        wait_until(lambda: "2/2" in row_of(tmux.screen(), socket.gethostname()),
                   what="the busy worker", show=tmux.screen)
        save_screenshot(tmux, artifacts(f"top-{place.tech}", tmp_path) / "top.svg")
    finally:
        code, err = stop(worker)
    assert code == 0, err
    tmux("send-keys", "-t", "top", "q")
    wait_until(lambda: "TOP-EXIT=0" in tmux.screen(), limit=10, what="top to quit on q")


def test_top_quits_on_ctrl_c(tmux: Tmux, sqlite_place: Place, tmp_path: Path) -> None:
    start_top(tmux, sqlite_place, tmp_path)
    wait_until(lambda: "OmniQ top" in tmux.screen(), what="the first screen")
    tmux("send-keys", "-t", "top", "C-c")
    wait_until(lambda: "TOP-EXIT=0" in tmux.screen(), limit=10, what="top to quit on Ctrl-C")


def test_top_piped_prints_one_snapshot(sqlite_place: Place) -> None:
    sqlite_place.api.enqueue("omniq.examples:add", 1, 2)
    code, out, err = run_omniq(["top"], sqlite_place.env, timeout=30)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("# queues: QUEUE\tREADY")
    assert lines[1].startswith("default\t1\t0\t0\t0\t")
    assert "\x1b[" not in out  # no terminal codes in a pipe


def save_screenshot(tmux: Tmux, path: Path) -> None:
    """The pane as the terminal shows it (colours too), as an SVG picture."""
    from rich.console import Console
    from rich.text import Text

    with open(os.devnull, "w") as nowhere:
        picture = Console(record=True, width=COLUMNS, force_terminal=True, file=nowhere)
        picture.print(Text.from_ansi(tmux.screen(escapes=True).rstrip("\n") + "\n"))
    path.write_text(picture.export_svg(title="omniq top"), encoding="utf-8")
