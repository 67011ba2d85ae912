"""The README's two commands are the contract with a new user, and CI must run exactly them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_readme_has_install_and_test_commands():
    install, test = readme_commands()
    assert "pip install" in install and "tsqp generate --model smollm2-135m-instruct" in install
    assert "pytest" in test


def test_ci_runs_the_readme_commands_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in readme_commands():
        assert command in ci_lines, f"{command!r} is not a line of .ci/run"
    assert "set -euo pipefail" in ci_lines
    assert not any("|| true" in line for line in ci_lines if "pytest" in line)
