"""The folder layout is the architecture: which side may import which.

tsqp/tee (trusted) and tsqp/api (the HTTP API the TEE process serves) never reach the untrusted
server's code, the benchmark tools or transformers; tsqp/server never reaches the TEE's; tsqp/model
and tsqp/wire, which both sides use, reach neither.
Checked twice: statically over every import statement (function-level ones too), and by importing
the TEE's entry points in a fresh interpreter and looking at what got loaded. The same statements
must draw no import circle, and every file and function stays small enough to read at once.
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
    "attest": ("tsqp.tee", "tsqp.server", "tsqp.measure", "tsqp.api", "transformers"),  # both ends: the TEE, a user
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
    files = sorted((PACKAGE / folder).rglob("*.py"))  # subpackages too (tsqp/model/families)
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


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """tsqp module -> the tsqp modules it imports, at the top or inside a function (either closes a circle
    once both have run); `from tsqp.a import b` reaches the module tsqp.a.b when there is one, else tsqp.a."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {
            imported if imported in modules else imported.rpartition(".")[0]
            for imported in imported_names(path)
            if imported in modules or imported.rpartition(".")[0] in modules
        } - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None: a depth-first search that meets a module still open."""
    state: dict[str, str] = {}  # module -> "open" while on the search path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_circle_finder_names_a_circle():
    graph = {"tsqp.a": {"tsqp.b"}, "tsqp.b": {"tsqp.c"}, "tsqp.c": {"tsqp.a"}, "tsqp.d": {"tsqp.a"}}
    assert find_cycle(graph) == ["tsqp.a", "tsqp.b", "tsqp.c", "tsqp.a"]
    assert find_cycle({"tsqp.a": {"tsqp.b"}, "tsqp.b": set()}) is None


MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def function_lengths(tree: ast.AST, prefix: str = ""):
    """(dotted name, lines from `def` to the last line of its body) for every function, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node.end_lineno - node.lineno + 1
            yield from function_lengths(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from function_lengths(node, prefix + node.name + ".")
        else:
            yield from function_lengths(node, prefix)


def oversized() -> dict[str, int]:
    """Every file over MAX_FILE_LINES and function over MAX_FUNCTION_LINES under tsqp/, with its length."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        where = str(path.relative_to(PACKAGE.parent))
        if len(text.splitlines()) > MAX_FILE_LINES:
            found[where] = len(text.splitlines())
        for name, length in function_lengths(ast.parse(text, where)):
            if length > MAX_FUNCTION_LINES:
                found[f"{where}:{name}"] = length
    return found


def test_files_and_functions_stay_small():
    offenders = {f"{where} ({lines} lines)" for where, lines in oversized().items()}
    assert offenders == set(), f"over {MAX_FILE_LINES} lines a file or {MAX_FUNCTION_LINES} a function"
