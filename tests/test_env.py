"""The environment-variable registry: every variable read through it, at start, and the README's table is it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tsqp import env
from tsqp.errors import TsqpError

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\b(?:TSQP|LLAMA)_[A-Z][A-Z_]*[A-Z]\b")
DIRECT_READ = re.compile(r"os\.(?:environ\.get|getenv)\(\s*[\"'](?:TSQP|LLAMA)_|os\.environ\[\s*[\"'](?:TSQP|LLAMA)_")


def test_the_readme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert env.markdown_table() in readme, "README's table differs: paste `python -m tsqp.env` into it"


def test_every_variable_named_in_the_package_is_registered():
    for path in sorted((ROOT / "tsqp").rglob("*.py")):
        unknown = set(NAME.findall(path.read_text())) - set(env.BY_NAME)
        assert not unknown, f"{path.relative_to(ROOT)} names {sorted(unknown)}, which tsqp/env.py does not list"


def test_no_variable_is_read_outside_the_registry():
    for path in sorted((ROOT / "tsqp").rglob("*.py")):
        if path.name != "env.py":
            assert not DIRECT_READ.search(path.read_text()), f"{path.relative_to(ROOT)} reads a variable itself"


def test_values_are_read_when_asked_for_and_parsed(monkeypatch):
    monkeypatch.delenv("TSQP_API_PORT", raising=False)
    assert env.read("TSQP_API_PORT") == 8000
    monkeypatch.setenv("TSQP_API_PORT", "")
    assert env.read("TSQP_API_PORT") == 8000, "empty is unset"
    monkeypatch.setenv("TSQP_API_PORT", "9001")
    assert env.read("TSQP_API_PORT") == 9001
    monkeypatch.setenv("TSQP_DOORBELL_NAP", "0")
    assert env.read("TSQP_DOORBELL_NAP") is False
    monkeypatch.setenv("TSQP_PRIVATE", "yes")
    assert env.read("TSQP_PRIVATE") is True
    monkeypatch.setenv("TSQP_CACHE", "~/somewhere")
    assert env.read("TSQP_CACHE") == Path.home() / "somewhere"


@pytest.mark.parametrize(("name", "value"), [("TSQP_API_PORT", "eighty"), ("TSQP_PRIVATE", "maybe")])
def test_a_bad_value_is_a_one_line_error_that_names_it(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(TsqpError, match=name):
        env.read(name)
