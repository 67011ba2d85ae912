"""What a quote commits to, and the evidence document `GET /v1/attestation` serves.

A DCAP quote carries 64 bytes of report data chosen by the TEE. They are split in two halves:

    report_data[0:32]  = sha256(DER SubjectPublicKeyInfo of the API's TLS key)
    report_data[32:64] = sha256(canonical JSON of the claims: the model's identity and the settings)

The first half is Gramine's RA-TLS convention (ra_tls_attest.c hashes the DER public key into the
first 32 bytes and its verifier compares only those), so a standard RA-TLS verifier accepts our
certificate too; the second half is what a TSQP client checks in addition: which model (its
fingerprint, and the GGUF file's sha256 when it came from one) and which settings (private mode,
Freivalds verification, pad bits) the enclave runs with.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

TEE_TYPES = ("sgx", "tdx", "none")
SETTINGS = ("private", "verify", "pad_bits")  # what a client may require (--expect-settings)


def spki_sha256(cert_der: bytes) -> bytes:
    """sha256 over the DER SubjectPublicKeyInfo of a certificate's key (RA-TLS's report data)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_der_x509_certificate(cert_der).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def canonical(claims: dict) -> bytes:
    """The claims as the bytes that are hashed: sorted keys, no spaces, UTF-8."""
    return json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def report_data(key_sha256: bytes, claims: dict) -> bytes:
    """The 64 bytes a quote commits to: the TLS key's hash, then the claims' hash."""
    return key_sha256 + hashlib.sha256(canonical(claims)).digest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def make_claims(fingerprint: str, gguf: Path | None, private: bool, verify: bool, pad_bits: int) -> dict:
    """The model's identity and the settings a client relies on; pad bits matter in private mode only."""
    model = {"fingerprint": fingerprint, "gguf_sha256": file_sha256(gguf) if gguf is not None else None}
    settings = {"private": private, "verify": verify, "pad_bits": pad_bits if private else None}
    return {"model": model, "settings": settings}


@dataclass(frozen=True)
class Evidence:
    """A quote (None under tee "none") over report_data(key_sha256, claims)."""

    tee: str  # one of TEE_TYPES
    quote: bytes | None
    key_sha256: bytes
    claims: dict

    def document(self) -> dict:
        """The JSON of `GET /v1/attestation`; the measurement is read from the quote, for people (the
        client reads it again from the verified quote)."""
        body = {
            "tee": self.tee,
            "attested": self.quote is not None,
            "quote": base64.b64encode(self.quote).decode() if self.quote is not None else None,
            "measurement": measurement(self.quote) if self.quote is not None else None,
            "tls_key_sha256": self.key_sha256.hex(),
            "report_data": report_data(self.key_sha256, self.claims).hex(),
            **self.claims,
        }
        if self.quote is None:
            body["reason"] = "no TEE attestation is available in this process: nothing here is attested"
        return body

    @staticmethod
    def from_document(body: dict) -> Evidence:
        """The evidence a server sent; shapes are checked here, contents by verify.py."""
        try:
            quote = base64.b64decode(body["quote"], validate=True) if body.get("quote") is not None else None
            return Evidence(
                tee=str(body["tee"]),
                quote=quote,
                key_sha256=bytes.fromhex(body["tls_key_sha256"]),
                claims={"model": dict(body["model"]), "settings": dict(body["settings"])},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the attestation document is malformed ({exc})") from None


def measurement(quote: bytes) -> dict:
    """MRENCLAVE/MRSIGNER of an SGX quote, or MRTD and RTMR0-3 of a TDX quote, as hex: read at their
    offsets, for people (the client reads them again from the quote dcap-qvl verified), so the TEE
    process needs no quote library."""
    version, tee_type = struct.unpack_from("<HxxI", quote)
    if tee_type == 0:  # SGX: the enclave report follows the 48-byte header
        return {"mrenclave": quote[112:144].hex(), "mrsigner": quote[176:208].hex()}
    body = 48 + (6 if version >= 5 else 0)  # v5 adds the body's type and size
    mrtd = body + 136  # after TEE_TCB_SVN, MRSEAM, MRSIGNERSEAM, SEAMATTRIBUTES, TDATTRIBUTES, XFAM
    rtmrs = {f"rtmr{i}": quote[mrtd + 192 + 48 * i : mrtd + 240 + 48 * i].hex() for i in range(4)}
    return {"mrtd": quote[mrtd : mrtd + 48].hex(), **rtmrs}
