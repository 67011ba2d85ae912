"""Prints the Python files the enclave trusts, as few comma-separated `file:` paths as cover them.

Run by gramine/Makefile with the interpreter that has tsqp installed. The files are OpenSSL's
configuration, the stdlib (without its site-packages, tests and GUI tools) and the installed files of
tsqp's runtime dependencies, followed through their requirements (no extras), without torch's C++
headers. A folder whose files are all kept is printed as one `folder/` entry, otherwise its kept
children are.

Why not the whole stdlib and site-packages folders: gramine-manifest expands every trusted folder into
one hashed entry per file and the LibOS parses them all at every start; a venv with test tools and a
base interpreter with its own site-packages gave 93,000 entries and a start that took minutes.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import ssl
import sys
import sysconfig

from packaging.requirements import Requirement

STDLIB_LEFT_OUT = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip"}
# Imported when installed though no requirement names them (anyio: `try: import sniffio`): under Gramine
# an installed but untrusted package fails with PermissionError, which such a try does not catch.
OPTIONAL_IMPORTS = ("sniffio",)
PACKAGE_LEFT_OUT = re.compile(r"^torch/include/")  # C++ headers: 9,000 files no import opens


def dependency_files(*roots: str) -> set[str]:
    """Absolute paths of the files installed by `roots` and their requirements, torch's headers left out."""
    seen: set[str] = set()
    files: set[str] = set()
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
        for file in dist.files or []:
            path = os.path.realpath(dist.locate_file(file))
            if not PACKAGE_LEFT_OUT.search(str(file)) and not str(file).startswith("..") and os.path.isfile(path):
                files.add(path)
    return files


def stdlib_files(stdlib: str) -> set[str]:
    files = set()
    for top, folders, names in os.walk(stdlib):
        if top == stdlib:
            folders[:] = [f for f in folders if f not in STDLIB_LEFT_OUT and not f.startswith("config-")]
        files.update(os.path.join(top, name) for name in names)
    return files


def cover(folder: str, kept: set[str]) -> list[str]:
    """The fewest entries under `folder` naming exactly the kept files in it (folders end with '/')."""
    entries, whole = [], True
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            inner = cover(entry.path, kept)
            whole = whole and inner == [entry.path + "/"]
            entries += inner
        elif entry.path in kept:
            entries.append(entry.path)
        else:
            whole = False
    return [folder + "/"] if whole and entries else entries


def main() -> None:
    """argv: the site-packages folders (comma-separated, as gramine/Makefile passes them)."""
    stdlib = os.path.realpath(sysconfig.get_path("stdlib"))
    kept = stdlib_files(stdlib) | dependency_files("tsqp", *OPTIONAL_IMPORTS)
    entries = []
    for top in dict.fromkeys([stdlib, *(os.path.realpath(p) for p in ",".join(sys.argv[1:]).split(",") if p)]):
        for entry in sorted(os.scandir(top), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                if top != stdlib or (entry.name not in STDLIB_LEFT_OUT and not entry.name.startswith("config-")):
                    entries += cover(entry.path, kept)
            elif entry.path in kept:
                entries.append(entry.path)
    # OpenSSL's configuration, read when `ssl` or cryptography loads OpenSSL (OPENSSLDIR/openssl.cnf).
    openssl_cnf = os.path.join(os.path.dirname(ssl.get_default_verify_paths().openssl_capath), "openssl.cnf")
    if os.path.isfile(openssl_cnf):
        entries.append(openssl_cnf)
    print(",".join(entries))


if __name__ == "__main__":
    main()
