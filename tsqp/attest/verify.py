"""The client's check of a server's evidence: the quote against Intel's collateral, then what it binds.

Checks, in order, each refusing with one line (`Refused`) that names the check:

1. there is a quote at all (a server without a TEE says tee "none": refused, never a fallback);
2. dcap-qvl verifies it: the PCK certificate chain up to Intel's SGX root (or, in tests only, a root
   the caller hands in), the CRLs, the QE report and its signature, the quote's signature, and the
   TCB info and QE identity, signed and not past their next update;
3. the platform's TCB status is one the user allows (default: UpToDate only);
4. the quote is of the TEE type the server claims, and not from a debug enclave or debug TD;
5. the measurement is the expected one (MRENCLAVE and/or MRSIGNER for SGX, MRTD for TDX);
6. report_data[0:32] is sha256 of the public key of the certificate this very connection presented;
7. report_data[32:64] is sha256 of the claims (model and settings) the server reports;
8. the model and the settings are the ones the user expects.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from tsqp.attest.evidence import SETTINGS, Evidence, canonical, spki_sha256
from tsqp.errors import TsqpError

DEFAULT_TCB = ("UpToDate",)
INTEL_PCS_URL = "https://api.trustedservices.intel.com"  # collateral when none is named (dcap-qvl's too)


class Refused(TsqpError):
    """The evidence failed a check: the server must not be sent anything."""


@dataclass(frozen=True)
class Expectation:
    """What the user requires. At least one measurement must be given for the server's TEE type."""

    mrenclave: str | None = None
    mrsigner: str | None = None
    mrtd: str | None = None
    model: str | None = None  # sha256 of the GGUF file, or the model's fingerprint
    settings: dict = field(default_factory=dict)  # e.g. {"private": True}
    allow_tcb: tuple[str, ...] = DEFAULT_TCB
    allow_debug: bool = False  # a debug enclave's memory is readable by the host: never in production


@dataclass(frozen=True)
class QuoteFacts:
    """What a quote that dcap-qvl verified says."""

    tee: str  # "sgx" or "tdx"
    tcb_status: str
    advisories: tuple[str, ...]
    measurement: dict  # hex strings
    report_data: bytes
    debug: bool


@dataclass(frozen=True)
class Verified:
    facts: QuoteFacts
    claims: dict
    key_sha256: bytes

    def line(self) -> str:
        shown = ", ".join(f"{name.upper()} {value}" for name, value in self.facts.measurement.items())
        model = self.claims["model"]
        gguf = model.get("gguf_sha256")
        ident = f"GGUF sha256 {gguf}" if gguf else f"fingerprint {model['fingerprint']}"
        settings = ", ".join(f"{k}={v}" for k, v in self.claims["settings"].items())
        return (
            f"verified: {self.facts.tee} quote, TCB {self.facts.tcb_status}, {shown}; model {ident}; {settings}; "
            f"TLS key sha256 {self.key_sha256.hex()}"
        )


def parse_settings(text: str | None) -> dict:
    """--expect-settings private=true,pad_bits=20 -> {"private": True, "pad_bits": 20}."""
    values = {"true": True, "false": False, "none": None}
    settings = {}
    for part in (text or "").replace(" ", "").split(","):
        name, equals, value = part.partition("=")
        if not equals or not name:
            if part:
                raise TsqpError(f"--expect-settings takes NAME=VALUE pairs, got {part!r}")
            continue
        settings[name] = values[value.lower()] if value.lower() in values else int(value) if value.isdigit() else value
    return settings


def load_collateral(source: str, quote: bytes):
    """dcap-qvl collateral from a JSON file (dcap-qvl's format), or fetched from a PCCS/PCS URL."""
    import asyncio

    import dcap_qvl

    async def fetch():  # dcap-qvl's future needs the running loop when it is made
        return await dcap_qvl.get_collateral(source, quote)

    if source.startswith(("https://", "http://")):
        try:
            return asyncio.run(fetch())
        except (ValueError, RuntimeError) as exc:
            raise Refused(f"cannot fetch the collateral from {source} ({first_line(exc)})") from None
    path = Path(source)
    if not path.is_file():
        raise TsqpError(f"--collateral {source}: no such file (give a collateral JSON file or a PCCS/PCS URL)")
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(path.read_text())
    except ValueError as exc:
        raise TsqpError(f"--collateral {source} is not dcap-qvl collateral JSON ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = [line for line in lines[1:] if line != "Caused by:"]
    return lines[0] + (f": {detail[-1]}" if detail else "") if lines else type(exc).__name__


def verify_quote(quote: bytes, collateral, now: int | None = None, root_ca_der: bytes | None = None) -> QuoteFacts:
    """Check 2: dcap-qvl's verification; root_ca_der None means Intel's SGX root (dcap-qvl's own)."""
    import dcap_qvl

    now = int(time.time()) if now is None else now
    try:
        if root_ca_der is None:
            verified = dcap_qvl.verify(quote, collateral, now)
        else:
            verified = dcap_qvl.verify_with_root_ca(quote, collateral, root_ca_der, now)
        parsed = dcap_qvl.parse_quote(quote)
    except ValueError as exc:
        raise Refused(f"the quote failed verification against the collateral ({first_line(exc)})") from None
    report = parsed.report
    if parsed.is_sgx():
        measurement = {"mrenclave": report.mr_enclave.hex(), "mrsigner": report.mr_signer.hex()}
        debug = bool(report.attributes[0] & 0x02)  # ATTRIBUTES.DEBUG
    else:
        rtmrs = (report.rt_mr0, report.rt_mr1, report.rt_mr2, report.rt_mr3)
        measurement = {"mrtd": report.mr_td.hex(), **{f"rtmr{i}": m.hex() for i, m in enumerate(rtmrs)}}
        debug = bool(report.td_attributes[0] & 0x01)  # TDATTRIBUTES.DEBUG
    tee = "sgx" if parsed.is_sgx() else "tdx"
    return QuoteFacts(tee, verified.status, tuple(verified.advisory_ids), measurement, report.report_data, debug)


def check_platform(facts: QuoteFacts, expect: Expectation) -> None:
    """Checks 3 to 5: TCB status, debug, measurement."""
    if facts.tcb_status not in expect.allow_tcb:
        advisories = f", advisories {', '.join(facts.advisories)}" if facts.advisories else ""
        raise Refused(
            f"the platform's TCB status is {facts.tcb_status}{advisories}; allowed: {', '.join(expect.allow_tcb)} "
            f"(--allow-tcb {facts.tcb_status} if you accept it)"
        )
    if facts.debug and not expect.allow_debug:
        kind = "enclave" if facts.tee == "sgx" else "TD"
        raise Refused(f"the quote comes from a debug {kind}: its memory is not confidential to the host")
    if facts.tee == "sgx":
        wanted = {"mrenclave": expect.mrenclave, "mrsigner": expect.mrsigner}
    else:
        wanted = {"mrtd": expect.mrtd}
    wanted = {name: value.lower() for name, value in wanted.items() if value}
    if not wanted:
        flags = "--expect-mrenclave (or --expect-mrsigner)" if facts.tee == "sgx" else "--expect-mrtd"
        raise Refused(f"nothing to compare the {facts.tee} measurement with: give {flags}")
    for name, value in wanted.items():
        if facts.measurement[name] != value:
            raise Refused(f"{name.upper()} is {facts.measurement[name]}, expected {value}")


def check_binding(facts: QuoteFacts, evidence: Evidence, cert_der: bytes) -> None:
    """Checks 6 and 7: the quote commits to the presented key and to the reported claims."""
    presented = spki_sha256(cert_der)
    if facts.report_data[:32] != presented or evidence.key_sha256 != presented:
        raise Refused("the quote does not commit to the TLS key this server presented (report data differs)")
    if facts.report_data[32:] != hashlib.sha256(canonical(evidence.claims)).digest():
        raise Refused("the quote does not commit to the model and settings this server reports (report data differs)")


def check_claims(claims: dict, expect: Expectation) -> None:
    """Check 8: the model and the settings the user expects."""
    model = claims["model"]
    if expect.model and expect.model.lower() not in (model.get("gguf_sha256"), model.get("fingerprint")):
        raise Refused(
            f"the server runs model {model.get('gguf_sha256') or model.get('fingerprint')}, expected {expect.model}"
        )
    for name, value in expect.settings.items():
        if name not in SETTINGS:
            raise TsqpError(f"unknown setting {name!r} (settings: {', '.join(SETTINGS)})")
        if claims["settings"].get(name) != value:
            raise Refused(f"the server runs with {name}={claims['settings'].get(name)}, expected {name}={value}")


def verify_evidence(
    evidence: Evidence,
    cert_der: bytes,
    collateral,
    expect: Expectation,
    now: int | None = None,
    root_ca_der: bytes | None = None,
) -> Verified:
    """Every check above, in order; raises Refused at the first that fails. collateral: dcap-qvl's
    QuoteCollateralV3, or where to get it (a JSON file or a PCCS/PCS URL)."""
    if evidence.quote is None or evidence.tee == "none":
        raise Refused(f"the server reports no attestation (tee: {evidence.tee}): nothing proves what runs there")
    if isinstance(collateral, str):
        collateral = load_collateral(collateral, evidence.quote)
    facts = verify_quote(evidence.quote, collateral, now, root_ca_der)
    check_platform(facts, expect)
    if facts.tee != evidence.tee:
        raise Refused(f"the server claims a {evidence.tee} TEE but sent a {facts.tee} quote")
    check_binding(facts, evidence, cert_der)
    check_claims(evidence.claims, expect)
    return Verified(facts, evidence.claims, evidence.key_sha256)
