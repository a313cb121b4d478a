"""The README installs from this checkout, and CI runs its set-up commands (issue 9: 21, 22)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_no_install_from_pypi_by_name() -> None:
    # `omniq` on PyPI is an unrelated project: every install is of the checkout ('.').
    commands = [line for block in bash_blocks(README) for line in block.splitlines()]
    installs = [c for c in commands if "pip install" in c]
    assert installs and all(re.search(r"pip install (-e )?'?\.", c) for c in installs), installs
    prose = README.replace("`pip install omniq` (or `'omniq[redis]'`)", "")  # the warning
    assert "'omniq[" not in prose and "pip install omniq" not in prose


def test_ci_runs_the_readme_set_up_commands_on_the_stock_pip() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    assert "--upgrade pip" not in run and "python3 -m venv" in run
    section = README[README.index("## Set up") : README.index("## Quickstart")]
    setup, tests = bash_blocks(section)
    for word, block in (("omniq worker --burst", setup), ("pytest", tests)):
        got = subprocess.run(
            ["bash", "-c", f'source <(sed -n "/^readme_command()/,/^}}/p" .ci/run); '
             f'readme_command "{word}"'],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert got == block, (got, block)


def test_the_test_extra_pins_one_consistent_s3_stack() -> None:
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["test"]
    names = {re.split(r"[<>=!\[ ]", item)[0] for item in extra}
    assert {"aiobotocore", "botocore", "boto3"} <= names
