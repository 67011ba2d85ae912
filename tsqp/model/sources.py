"""What `--model` accepts: a Hugging Face folder, a GGUF file or a preset name, each resolved to a folder.

Every command, the server's and the clients', runs on a Hugging Face folder: a GGUF file is converted
once into the cache (`tsqp.model.gguf`), a preset is written (random weights) or fetched (a real
model) into it. The folder is what both sides open, and what an enclave's manifest trusts.
"""

from __future__ import annotations

from pathlib import Path

from tsqp.errors import ModelError
from tsqp.model.fetch import REAL_MODELS, fetched_gguf
from tsqp.model.presets import PRESETS, preset_path


def model_names() -> list[str]:
    """Every preset name: the random-weight shapes, then the real models."""
    return sorted(PRESETS) + sorted(REAL_MODELS)


def resolve_model(spec: str | Path) -> Path:
    """The Hugging Face folder that --model SPEC names (converting or fetching into the cache first)."""
    text = str(spec)
    if text in PRESETS:
        return preset_path(text)
    path = fetched_gguf(text) if text in REAL_MODELS else Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        from tsqp.model.gguf import gguf_model_dir, is_gguf  # the converter loads only for a file

        if is_gguf(path):
            return gguf_model_dir(path)
        raise ModelError(
            f"{path} is neither a model folder nor a GGUF file: --model takes a Hugging Face folder, "
            f"a .gguf file or a preset ({', '.join(model_names())})"
        )
    raise ModelError(
        f"model folder {path} does not exist: --model takes a Hugging Face folder, a .gguf file "
        f"or a preset ({', '.join(model_names())})"
    )


def served_name(spec: str | Path) -> str:
    """The name a model goes by in the API (`/v1/models`): a preset's name, else the folder's or file's."""
    text = str(spec)
    if text in PRESETS or text in REAL_MODELS:
        return text
    path = Path(text).expanduser()
    return path.stem if path.is_file() else path.resolve().name
