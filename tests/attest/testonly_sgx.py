"""TEST ONLY: SGX quotes signed by a certificate chain made here, never by Intel, for machines without SGX.

The quotes are structurally real DCAP v3 ECDSA-P256 quotes: the real sample quote's header, enclave
report and quoting-enclave report (data/sgx_quote) with the measurement and report data replaced, a
fresh attestation key signing header and report, the QE report committing to that key and signed by a
test PCK key, and a PEM certification chain (type 5) up to a test root. Its collateral (the TCB info
and QE identity of the real sample, re-dated and signed by a test TCB signing key; CRLs of the test
CAs) is dcap-qvl's JSON. dcap-qvl verifies these quotes only when handed this world's root
(`verify_with_root_ca`): with Intel's root, the default everywhere in tsqp, they are refused.

Nothing in tsqp can select this source: tests start `tsqp api` and `tsqp verify` through this file's
`__main__`, which hands the source or the root to tsqp.cli's commands as Python arguments:

    python tests/attest/testonly_sgx.py WORLD_DIR api ARGS...      # tsqp api with TestOnlySgxQuotes
    python tests/attest/testonly_sgx.py WORLD_DIR verify ARGS...   # tsqp verify trusting WORLD's root
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import json
import struct
import sys
import threading
import urllib.parse
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

DATA = Path(__file__).resolve().parent / "data"
SGX_EXTENSION = x509.ObjectIdentifier("1.2.840.113741.1.13.1")  # FMSPC, CPUSVN, PCESVN... of the platform
MRENCLAVE = bytes.fromhex("7e57" * 16)  # this world's enclave measurement
MRSIGNER = bytes.fromhex("5167" * 16)
NAMES = ("root", "processor", "tcb", "pck", "attest")


def raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA-P256-SHA256 as DCAP writes it: r and s, 32 bytes each, big-endian."""
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TSQP tests, not Intel"),
        ]
    )


def certificate(subject: str, key, issuer: str, issuer_key, ca: int | None, extra=()) -> x509.Certificate:
    """ca: the path length of a CA, None for an end entity."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca is not None, path_length=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    usage = dict(
        digital_signature=ca is None,
        content_commitment=ca is None,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca is not None,
        crl_sign=ca is not None,
        encipher_only=False,
        decipher_only=False,
    )
    builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    for extension in extra:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(issuer_key, hashes.SHA256())


def crl(issuer: str, issuer_key) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    built = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name(issuer))
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=30))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return built.public_bytes(serialization.Encoding.DER)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def redated(document: str, **changes) -> str:
    """The real sample's TCB info or QE identity, valid from an hour ago for 30 days, with changes."""
    body = json.loads(document)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    body["issueDate"] = (now - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body["nextUpdate"] = (now + datetime.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body.update(changes)
    return json.dumps(body, separators=(",", ":"))


class TestOnlyDcapWorld:
    """A test root, its PCK and TCB signing chains, a platform key and an attestation key, in a folder
    (so a subprocess can load the same world): root.der, collateral.json, *.key, *.pem."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path):
        self.folder = folder
        load = serialization.load_pem_private_key
        self.keys = {n: load((folder / f"{n}.key").read_bytes(), None) for n in NAMES}
        self.chain = (folder / "pck-chain.pem").read_text()  # leaf, processor CA, root
        self.root_der = (folder / "root.der").read_bytes()
        self.collateral = folder / "collateral.json"

    @staticmethod
    def create(folder: Path, tcb_status: str = "UpToDate") -> TestOnlyDcapWorld:
        """A new world; every TCB level of the sample's TCB info gets tcb_status."""
        import dcap_qvl

        folder.mkdir(parents=True, exist_ok=True)
        keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in NAMES}
        for n, key in keys.items():
            encoded = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            (folder / f"{n}.key").write_bytes(encoded)
        real = dcap_qvl.parse_quote((DATA / "sgx_quote").read_bytes())
        real_leaf = x509.load_pem_x509_certificates(real.cert_chain_pem_bytes())[0]
        root_cn, processor_cn = "Intel SGX Root CA", "Intel SGX PCK Processor CA"
        root = certificate(root_cn, keys["root"], root_cn, keys["root"], ca=1)
        processor = certificate(processor_cn, keys["processor"], root_cn, keys["root"], ca=0)
        tcb = certificate("Intel SGX TCB Signing", keys["tcb"], root_cn, keys["root"], ca=None)
        sgx = [real_leaf.extensions.get_extension_for_oid(SGX_EXTENSION)]
        leaf = certificate("Intel SGX PCK Certificate", keys["pck"], processor_cn, keys["processor"], None, sgx)
        (folder / "pck-chain.pem").write_text(pem(leaf) + pem(processor) + pem(root))
        (folder / "root.der").write_bytes(root.public_bytes(serialization.Encoding.DER))
        sample = json.loads((DATA / "sgx_quote_collateral.json").read_text())
        levels = json.loads(sample["tcb_info"])["tcbLevels"]
        for level in levels:
            level["tcbStatus"] = tcb_status
            level.pop("advisoryIDs", None)
        tcb_info = redated(sample["tcb_info"], tcbLevels=levels)
        qe_identity = redated(sample["qe_identity"])
        collateral = {
            "pck_crl_issuer_chain": pem(processor) + pem(root),
            "root_ca_crl": crl(root_cn, keys["root"]).hex(),
            "pck_crl": crl(processor_cn, keys["processor"]).hex(),
            "tcb_info_issuer_chain": pem(tcb) + pem(root),
            "tcb_info": tcb_info,
            "tcb_info_signature": raw_signature(keys["tcb"], tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": pem(tcb) + pem(root),
            "qe_identity": qe_identity,
            "qe_identity_signature": raw_signature(keys["tcb"], qe_identity.encode()).hex(),
        }
        (folder / "collateral.json").write_text(json.dumps(collateral))
        return TestOnlyDcapWorld(folder)

    def quote(self, report_data: bytes, mrenclave: bytes = MRENCLAVE, mrsigner: bytes = MRSIGNER) -> bytes:
        """A v3 quote of this world's enclave over report_data (64 bytes)."""
        assert len(report_data) == 64
        sample = (DATA / "sgx_quote").read_bytes()
        header, body = sample[:48], bytearray(sample[48:432])
        body[64:96], body[128:160], body[320:384] = mrenclave, mrsigner, report_data  # report body offsets
        attest = self.keys["attest"]
        point = attest.public_key().public_numbers()
        attest_raw = point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")
        start = 436 + 64 + 64  # after the signature length, the report signature and the attestation key
        qe_report = bytearray(sample[start : start + 384])
        (auth_size,) = struct.unpack_from("<H", sample, start + 384 + 64)
        auth = sample[start + 384 + 64 + 2 : start + 384 + 64 + 2 + auth_size]
        qe_report[320:384] = hashlib.sha256(attest_raw + auth).digest() + bytes(32)
        chain = self.chain.encode() + b"\0"
        signature = (
            raw_signature(attest, header + bytes(body))
            + attest_raw
            + bytes(qe_report)
            + raw_signature(self.keys["pck"], bytes(qe_report))
            + struct.pack("<H", len(auth))
            + auth
            + struct.pack("<HI", 5, len(chain))
            + chain
        )
        return header + bytes(body) + struct.pack("<I", len(signature)) + signature


@contextmanager
def pccs(world: TestOnlyDcapWorld):
    """A local PCCS serving the world's collateral on the paths and headers dcap-qvl's get_collateral asks
    for (Intel's PCS API v4); yields its http:// URL."""
    collateral = json.loads(world.collateral.read_text())
    quoted = urllib.parse.quote
    routes = {
        "/sgx/certification/v4/pckcrl": (
            {"SGX-PCK-CRL-Issuer-Chain": quoted(collateral["pck_crl_issuer_chain"])},
            bytes.fromhex(collateral["pck_crl"]),
        ),
        "/sgx/certification/v4/tcb": (
            {"SGX-TCB-Info-Issuer-Chain": quoted(collateral["tcb_info_issuer_chain"])},
            f'{{"tcbInfo":{collateral["tcb_info"]},"signature":"{collateral["tcb_info_signature"]}"}}'.encode(),
        ),
        "/sgx/certification/v4/qe/identity": (
            {"SGX-Enclave-Identity-Issuer-Chain": quoted(collateral["qe_identity_issuer_chain"])},
            f'{{"enclaveIdentity":{collateral["qe_identity"]},"signature":"{collateral["qe_identity_signature"]}"}}'.encode(),
        ),
        "/sgx/certification/v4/rootcacrl": ({}, collateral["root_ca_crl"].encode()),  # PCCS: hex
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            headers, body = routes.get(self.path.partition("?")[0], ({}, None))
            self.send_response(200 if body is not None else 404)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class TestOnlySgxQuotes:
    """The quote source (tsqp/attest/sources.py's protocol) of a test-only world."""

    __test__ = False
    tee = "sgx"

    def __init__(self, world: TestOnlyDcapWorld):
        self.world = world

    def quote(self, report_data: bytes) -> bytes:
        return self.world.quote(report_data)


if __name__ == "__main__":
    from tsqp import cli

    world = TestOnlyDcapWorld(Path(sys.argv[1]))
    cli.COMMANDS["api"] = partial(cli.cmd_api, source=TestOnlySgxQuotes(world))
    cli.COMMANDS["verify"] = partial(cli.cmd_verify, root_ca_der=world.root_der)
    sys.exit(cli.main(sys.argv[2:]))
