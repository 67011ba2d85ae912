"""tsqp/tee/enclave.py: a TEE process that fails to start under Gramine says what to change, in one line;
outside an enclave the error goes on unchanged."""

from __future__ import annotations

import errno

import pytest

from tsqp.tee import enclave


@pytest.fixture
def in_gramine(monkeypatch):
    monkeypatch.setattr(enclave, "in_enclave", lambda: True)


@pytest.mark.parametrize(
    ("exc", "knob"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/models/x/extra.bin"), "MODEL="),
        (PermissionError(errno.EACCES, "Permission denied", "/dev/shm/other"), "ARENA="),
        (MemoryError(), "ENCLAVE_SIZE"),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), "ENCLAVE_SIZE"),
        (ModuleNotFoundError("No module named 'yaml'", name="yaml"), "PYTHON="),
        (RuntimeError("can't start new thread"), "MAX_THREADS"),
    ],
)
def test_gramine_start_failures_name_the_build_knob(in_gramine, exc, knob):
    hint = enclave.advice(exc)
    assert hint is not None and knob in hint and "\n" not in hint


def test_other_errors_and_native_runs_get_no_advice(in_gramine, monkeypatch):
    assert enclave.advice(ValueError("bad")) is None
    monkeypatch.setattr(enclave, "in_enclave", lambda: False)
    assert enclave.advice(MemoryError()) is None
