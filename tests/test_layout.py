"""The folder layout is the architecture: which side may import which.

tsqp/tee (trusted) and tsqp/api (the HTTP API the TEE process serves) never reach the untrusted
server's code, the benchmark tools or transformers; tsqp/server never reaches the TEE's; tsqp/model
and tsqp/wire, which both sides use, reach neither.
Checked twice: statically over every import statement (function-level ones too), and by importing
the TEE's entry points in a fresh interpreter and looking at what got loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tsqp

PACKAGE = Path(tsqp.__file__).parent

FORBIDDEN = {
    "tee": ("tsqp.server", "tsqp.measure", "transformers"),
    "api": ("tsqp.server", "tsqp.measure", "transformers"),  # the API runs in the TEE process
    "server": ("tsqp.tee", "tsqp.measure", "transformers"),
    "model": ("tsqp.tee", "tsqp.server", "tsqp.measure", "transformers"),
    "wire": ("tsqp.tee", "tsqp.server", "tsqp.measure", "transformers"),
}


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from tsqp import server
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import; spell out the package so the layout stays checkable")
    return names


def reaches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_respect_the_boundary(folder):
    files = sorted((PACKAGE / folder).glob("*.py"))
    assert len(files) >= 2, f"tsqp/{folder} should hold the modules of its side"
    crossings = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in sorted(imported_names(path))
        if any(reaches(name, prefix) for prefix in FORBIDDEN[folder])
    ]
    assert crossings == []


def test_every_module_lives_in_a_side():
    """Top level keeps only the command line (cli, its options) and what every side shares (env: the variables)."""
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "env", "errors", "options", "stats", "tuning"]


def test_tee_entry_points_load_no_server_or_transformers():
    """What an enclave runs for `tsqp generate`: the CLI and the TEE modules, nothing of the server."""
    code = (
        "import json, sys; import tsqp.cli, tsqp.tee.runner, tsqp.tee.generate, tsqp.tee.verify, tsqp.tee.tokenizer, "
        "tsqp.api.serve; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('tsqp', 'transformers')))))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert "tsqp.tee.forward" in loaded and "tsqp.wire.transport" in loaded  # it did import the TEE side
    assert "tsqp.api.app" in loaded
    assert [m for m in loaded if reaches(m, "tsqp.server") or reaches(m, "tsqp.measure") or "transformers" in m] == []
