"""Where a quote comes from: Gramine's /dev/attestation (SGX), Linux's configfs-tsm (TDX), or nowhere.

A source turns 64 bytes of report data into a quote signed by the platform. `select` picks one for
`tsqp api --attestation`: "auto" takes what this process has (Gramine with DCAP attestation, then a
TDX guest), else "none"; naming sgx or tdx where it is not available is an error at start, never a
fallback to none. With none nothing claims to be attested (evidence.py says so in the document).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Protocol

from tsqp.errors import TsqpError

GRAMINE = Path("/dev/attestation")
TSM_REPORTS = Path("/sys/kernel/config/tsm/report")
CHOICES = ("auto", "sgx", "tdx", "none")


class QuoteSource(Protocol):
    tee: str  # "sgx", "tdx" or "none"

    def quote(self, report_data: bytes) -> bytes | None: ...


class NoQuotes:
    """No TEE: evidence without a quote, which every verifier refuses unless told to accept it."""

    tee = "none"

    def quote(self, report_data: bytes) -> None:
        return None


class GramineSgx:
    """Gramine's pseudo-files: write user_report_data, read the quote the quoting enclave signed over it."""

    tee = "sgx"

    def __init__(self, root: Path = GRAMINE):
        self.root = root

    def quote(self, report_data: bytes) -> bytes:
        try:
            (self.root / "user_report_data").write_bytes(report_data)
            quote = (self.root / "quote").read_bytes()
        except OSError as exc:
            raise TsqpError(f"cannot get an SGX quote from {self.root} ({exc.strerror or exc})") from None
        if len(quote) < 436 + 64:  # header, report body, signature length, and at least the signature
            raise TsqpError(f'Gramine returned a {len(quote)}-byte quote: is sgx.remote_attestation = "dcap"?')
        return quote


class TdxConfigfs:
    """The Linux configfs-tsm interface: a report folder, inblob in, outblob (the quote) out."""

    tee = "tdx"

    def __init__(self, root: Path = TSM_REPORTS):
        self.root = root

    def quote(self, report_data: bytes) -> bytes:
        try:
            return self.report(report_data)
        except OSError as exc:
            raise TsqpError(f"cannot get a TDX quote from {self.root} ({exc.strerror or exc}): run as root?") from None

    def report(self, report_data: bytes) -> bytes:
        entry = self.root / f"tsqp-{os.getpid()}-{secrets.token_hex(4)}"
        entry.mkdir()
        try:
            provider = (entry / "provider").read_text().strip()
            if provider != "tdx_guest":
                raise TsqpError(f"{self.root} is provided by {provider!r}, not a TDX guest (tdx_guest)")
            generation = (entry / "generation").read_text().strip()
            (entry / "inblob").write_bytes(report_data)
            quote = (entry / "outblob").read_bytes()
            if (entry / "generation").read_text().strip() != str(int(generation) + 1):
                raise TsqpError("another writer changed the TDX report while it was made: start again")
            return quote
        finally:
            entry.rmdir()


def gramine_dcap(root: Path = GRAMINE) -> bool:
    try:
        return (root / "attestation_type").read_text().strip() == "dcap"
    except OSError:
        return False


def select(choice: str, gramine: Path = GRAMINE, tsm: Path = TSM_REPORTS) -> QuoteSource:
    """The source `--attestation CHOICE` names; sgx or tdx where absent is an error, never none."""
    if choice not in CHOICES:
        raise TsqpError(f"--attestation takes one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "none":
        return NoQuotes()
    sgx, tdx = gramine_dcap(gramine), tsm.is_dir()
    if choice == "sgx" and not sgx:
        raise TsqpError(
            f"--attestation sgx: {gramine}/attestation_type does not say dcap (run under gramine-sgx with "
            'sgx.remote_attestation = "dcap", RA_TYPE=dcap in gramine/Makefile)'
        )
    if choice == "tdx" and not tdx:
        raise TsqpError(f"--attestation tdx: {tsm} does not exist (a TDX guest with configfs-tsm mounted)")
    if sgx and choice in ("auto", "sgx"):
        return GramineSgx(gramine)
    if tdx:
        return TdxConfigfs(tsm)
    return NoQuotes()
