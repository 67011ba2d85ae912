"""Attested clients: check a `tsqp api` server's evidence, then talk only to the key it attested.

`attest(url, expect, collateral)` reads `GET /v1/attestation` over one TLS connection, keeps the
certificate that connection presented, and runs every check of tsqp/attest/verify.py on them.
`attested_openai` then returns an `openai.OpenAI` whose HTTPS trusts that one certificate and nothing
else: a server that later presents another key fails the handshake; nothing falls back to the
system's CAs or to plain HTTP.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from dataclasses import dataclass

from tsqp.attest.evidence import Evidence
from tsqp.attest.verify import INTEL_PCS_URL, Expectation, Refused, Verified, verify_evidence
from tsqp.errors import TsqpError

FETCH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Attested:
    base_url: str  # https://HOST:PORT/v1
    cert_pem: str  # the attested certificate, to pin
    verified: Verified


def api_root(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url.rstrip("/").removesuffix("/v1"))
    if parts.scheme != "https":
        raise Refused(f"{url} is not https: plain HTTP cannot be bound to an attested key")
    if not parts.hostname:
        raise TsqpError(f"{url} names no host")
    return parts


def fetch_evidence(url: str, timeout: float = FETCH_TIMEOUT_S) -> tuple[Evidence, bytes]:
    """The server's evidence and the DER certificate the same TLS connection presented.

    The connection trusts no CA here on purpose: what vouches for the key is the quote, checked next."""
    parts = api_root(url)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout, context=context)
    try:
        connection.request("GET", parts.path + "/v1/attestation", headers={"Accept": "application/json"})
        cert_der = connection.sock.getpeercert(binary_form=True)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Refused(f"cannot read {url}'s attestation ({exc})") from None
    finally:
        connection.close()
    if response.status != 200:
        raise Refused(f"{url}/v1/attestation answered HTTP {response.status}: no evidence")
    try:
        return Evidence.from_document(json.loads(body)), cert_der
    except ValueError as exc:
        raise Refused(str(exc)) from None


def attest(
    url: str,
    expect: Expectation,
    collateral: str = INTEL_PCS_URL,
    now: int | None = None,
    root_ca_der: bytes | None = None,
) -> Attested:
    """Fetches and checks the evidence (collateral: a dcap-qvl JSON file or a PCCS/PCS URL, by default
    Intel's PCS).

    root_ca_der: tests only, a root of trust other than Intel's; None in every real use."""
    evidence, cert_der = fetch_evidence(url)
    verified = verify_evidence(evidence, cert_der, collateral, expect, now, root_ca_der)
    parts = api_root(url)
    return Attested(f"https://{parts.netloc}{parts.path}/v1", ssl.DER_cert_to_PEM_cert(cert_der), verified)


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """Trusts exactly this certificate. The host name is not checked: the attested key is the identity
    (an RA-TLS certificate names no host), and no other certificate is trusted at all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cert_pem)
    return context


def attested_openai(url: str, expect: Expectation, collateral: str = INTEL_PCS_URL, api_key: str = "none", **kwargs):
    """An `openai.OpenAI` for a verified server, its HTTPS pinned to the attested certificate.

    Raises Refused when a check fails; kwargs go to attest() (now, root_ca_der) and openai.OpenAI."""
    try:
        import openai
    except ImportError:
        raise TsqpError("attested_openai needs the openai package (pip install openai)") from None
    attest_kwargs = {name: kwargs.pop(name) for name in ("now", "root_ca_der") if name in kwargs}
    attested = attest(url, expect, collateral, **attest_kwargs)
    http_client = openai.DefaultHttpxClient(verify=pinned_context(attested.cert_pem))
    client = openai.OpenAI(base_url=attested.base_url, api_key=api_key, http_client=http_client, **kwargs)
    client.attestation = attested.verified
    return client
