"""One-line advice for the errors a TEE process meets at start under Gramine, each naming the build knob
(gramine/Makefile) that mends it. Stdlib only: it must work when importing torch is what failed."""

from __future__ import annotations

import errno
import os


def in_enclave() -> bool:
    """Gramine's LibOS (gramine-direct or gramine-sgx) provides /dev/attestation; Linux does not."""
    return os.path.exists("/dev/attestation")


def advice(exc: BaseException) -> str | None:
    """What to change for `exc`, or None when it is not a Gramine packaging error (or not in an enclave)."""
    if not in_enclave():
        return None
    if isinstance(exc, ModuleNotFoundError):
        return (
            f"module {exc.name!r} is not in the enclave: install it in the venv given as PYTHON=, "
            "make it a dependency of tsqp (gramine/trusted_python.py follows them) and rebuild"
        )
    if isinstance(exc, MemoryError) or getattr(exc, "errno", None) == errno.ENOMEM:
        return "the enclave ran out of memory: rebuild with a larger ENCLAVE_SIZE (make ENCLAVE_SIZE=16G ...)"
    if isinstance(exc, PermissionError) and exc.filename:
        return (
            f"{exc.filename} is not in the manifest's trusted or allowed files: "
            "an arena takes ARENA=NAME, a pads folder PRIVATE=1 PADS_DIR=..., a model file MODEL=...; rebuild"
        )
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return "the enclave has no thread slot left: rebuild with a larger MAX_THREADS (>= TORCH_THREADS + 16)"
    return None
