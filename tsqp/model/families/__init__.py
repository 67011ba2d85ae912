"""The model families TSQP runs, one small module each: its Hugging Face architecture and how its config.json
becomes a `family.Family`. Adding a family is a module here, listed in FAMILIES, plus its tests.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from tsqp.errors import ModelError
from tsqp.model.families import gemma3, llama, mistral, qwen2, qwen3

FAMILIES: dict[str, ModuleType] = {module.ARCHITECTURE: module for module in (llama, mistral, qwen2, qwen3, gemma3)}


def family_module(raw: dict[str, Any]) -> ModuleType:
    """The module of the config's architecture (its model_type must agree); one-line refusal otherwise."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    known = [FAMILIES[a] for a in archs if isinstance(a, str) and a in FAMILIES]
    if not archs:
        known = [m for m in FAMILIES.values() if model_type in m.MODEL_TYPES]
    if len(known) != 1 or model_type not in known[0].MODEL_TYPES:
        found = ", ".join(map(str, archs)) or model_type or "unknown"
        raise ModelError(f"unsupported architecture {found!r}: TSQP runs {', '.join(FAMILIES)} checkpoints")
    return known[0]
