"""TLS that ends inside the TEE: a key made here at start, a certificate written out for clients to pin.

The HTTP bytes cross the host's network stack, so the API's TLS must end in the TEE process or the
host reads every prompt and answer. `ephemeral` makes an ECDSA P-256 key in this process's memory
and a self-signed certificate for the names the API is reached by. The certificate is public and is
written where clients can pin it; the key never leaves in the clear: Python's ssl module loads keys
only from files, so uvicorn is handed the key encrypted under a random password that stays in memory,
in a private temporary file removed as soon as the server has loaded it.

The key is ECDSA P-384, the curve Gramine's RA-TLS verifier requires. When the process can quote
(tsqp/attest/sources.py), the certificate also carries the quote over the key's hash in Gramine's
RA-TLS extension (OID 1.2.840.113741.1337.6, the raw quote as the extension's value), so standard
RA-TLS verifiers accept it; `GET /v1/attestation` serves the same evidence as JSON.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tsqp.attest.evidence import Evidence

VALID_DAYS = 30
RA_TLS_QUOTE_OID = "1.2.840.113741.1337.6"  # Gramine's NON_STANDARD_INTEL_SGX_QUOTE_OID, without its tag


@dataclass
class TlsFiles:
    certfile: str
    keyfile: str
    password: str | None  # of an encrypted keyfile
    temporary_key: bool  # remove keyfile once loaded

    def loaded(self) -> None:
        """Called once the server holds the key in memory."""
        if self.temporary_key:
            Path(self.keyfile).unlink(missing_ok=True)


def ephemeral(
    cert_out: Path, host: str, evidence_for: Callable[[bytes], Evidence] | None = None
) -> tuple[TlsFiles, Evidence | None]:
    """A fresh key and a self-signed certificate for host, localhost and 127.0.0.1; writes cert_out.
    evidence_for: given sha256 of the key's DER SubjectPublicKeyInfo, the evidence over it; its quote,
    if any, goes into the certificate (RA-TLS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    evidence = evidence_for(hashlib.sha256(spki).digest()) if evidence_for is not None else None
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        address = ipaddress.ip_address(host)
        if str(address) != "127.0.0.1":
            names.append(x509.IPAddress(address))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tsqp api")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if evidence is not None and evidence.quote is not None:
        quote_oid = x509.ObjectIdentifier(RA_TLS_QUOTE_OID)
        cert = cert.add_extension(x509.UnrecognizedExtension(quote_oid, evidence.quote), critical=False)
    cert = cert.sign(key, hashes.SHA256())
    cert_out.parent.mkdir(parents=True, exist_ok=True)
    cert_out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    password = secrets.token_urlsafe(32)
    sealed = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    )
    handle, keyfile = tempfile.mkstemp(prefix="tsqp-api-", suffix=".key")  # 0600
    with os.fdopen(handle, "wb") as out:
        out.write(sealed)
    return TlsFiles(certfile=str(cert_out), keyfile=keyfile, password=password, temporary_key=True), evidence
