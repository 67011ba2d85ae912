"""The binding, in process: evidence over a key made by tsqp/api/tls.py, checked by verify.py against a
test-only DCAP world (testonly_sgx.py), and the quote sources' selection."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from testonly_sgx import MRENCLAVE, MRSIGNER, TestOnlyDcapWorld, TestOnlySgxQuotes, pccs

from tsqp.api.tls import RA_TLS_QUOTE_OID, ephemeral
from tsqp.attest import sources
from tsqp.attest.evidence import Evidence, canonical, make_claims, report_data
from tsqp.attest.verify import Expectation, Refused, check_claims, parse_settings, verify_evidence
from tsqp.errors import TsqpError

CLAIMS = make_claims("ab" * 32, None, private=True, verify=True, pad_bits=20)
EXPECT = Expectation(mrenclave=MRENCLAVE.hex())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return TestOnlyDcapWorld.create(tmp_path_factory.mktemp("world"))


def served(world, tmp_path, claims=CLAIMS) -> tuple[Evidence, bytes]:
    """The evidence and certificate `tsqp api --tls` would serve with the world's quote source."""
    source = TestOnlySgxQuotes(world)

    def evidence_for(key_sha256: bytes) -> Evidence:
        return Evidence(source.tee, source.quote(report_data(key_sha256, claims)), key_sha256, claims)

    files, evidence = ephemeral(tmp_path / f"cert-{len(list(tmp_path.iterdir()))}.pem", "127.0.0.1", evidence_for)
    files.loaded()
    cert = x509.load_pem_x509_certificate(open(files.certfile, "rb").read())
    return evidence, cert.public_bytes(serialization.Encoding.DER)


def refusal(call) -> str:
    with pytest.raises(Refused) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_the_certificate_follows_gramines_ra_tls_conventions(world, tmp_path):
    evidence, cert_der = served(world, tmp_path)
    cert = x509.load_der_x509_certificate(cert_der)
    assert isinstance(cert.public_key().curve, ec.SECP384R1)  # Gramine's verifier takes P-384 keys
    extension = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(RA_TLS_QUOTE_OID))
    assert extension.value.value == evidence.quote and not extension.critical
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    quoted = evidence.quote[368:432]  # the SGX report body's report data
    assert quoted[:32] == hashlib.sha256(spki).digest()
    assert quoted[32:] == hashlib.sha256(canonical(CLAIMS)).digest()


def test_evidence_verifies_against_the_test_root_only(world, tmp_path):
    evidence, cert_der = served(world, tmp_path)
    document = Evidence.from_document(evidence.document())
    assert document == evidence
    verified = verify_evidence(document, cert_der, str(world.collateral), EXPECT, root_ca_der=world.root_der)
    assert verified.facts.measurement == {"mrenclave": MRENCLAVE.hex(), "mrsigner": MRSIGNER.hex()}
    assert verified.line().startswith(f"verified: sgx quote, TCB UpToDate, MRENCLAVE {MRENCLAVE.hex()}")
    intel = refusal(lambda: verify_evidence(document, cert_der, str(world.collateral), EXPECT))
    assert intel.startswith("the quote failed verification against the collateral (")


def test_another_certificate_another_model_or_other_settings_are_refused(world, tmp_path):
    evidence, cert_der = served(world, tmp_path)
    _, other_cert = served(world, tmp_path)

    def check(evidence=evidence, cert=cert_der, expect=EXPECT):
        return verify_evidence(evidence, cert, str(world.collateral), expect, root_ca_der=world.root_der)

    assert "TLS key this server presented" in refusal(lambda: check(cert=other_cert))
    for changed in ({"model": {"fingerprint": "cd" * 32, "gguf_sha256": None}}, {"settings": {"private": False}}):
        lying = Evidence(evidence.tee, evidence.quote, evidence.key_sha256, {**CLAIMS, **changed})
        assert "model and settings this server reports" in refusal(lambda lying=lying: check(evidence=lying))
    message = refusal(lambda: check(expect=Expectation(mrenclave=MRENCLAVE.hex(), model="ef" * 32)))
    assert message == f"the server runs model {'ab' * 32}, expected {'ef' * 32}"
    wanted = Expectation(mrenclave=MRENCLAVE.hex(), settings={"verify": False})
    assert refusal(lambda: check(expect=wanted)) == "the server runs with verify=True, expected verify=False"
    check(expect=Expectation(mrenclave=MRENCLAVE.hex(), model="ab" * 32, settings=parse_settings("private=true")))


def test_a_server_without_a_quote_is_refused(tmp_path):
    evidence = Evidence("none", None, b"", CLAIMS)
    assert evidence.document()["attested"] is False
    message = refusal(lambda: verify_evidence(evidence, b"", "unused.json", EXPECT))
    assert message == "the server reports no attestation (tee: none): nothing proves what runs there"


def test_expired_test_collateral_is_refused(world, tmp_path):
    evidence, cert_der = served(world, tmp_path)
    late = 2**31  # 2038: past the world's TCB info, CRLs and certificates
    check = lambda: verify_evidence(evidence, cert_der, str(world.collateral), EXPECT, late, world.root_der)  # noqa: E731
    assert refusal(check).startswith("the quote failed verification against the collateral (")


def test_quote_sources_are_what_the_process_has_and_never_a_silent_none(tmp_path):
    assert isinstance(sources.select("none"), sources.NoQuotes)
    absent = tmp_path / "absent"
    assert isinstance(sources.select("auto", gramine=absent, tsm=absent), sources.NoQuotes)
    for choice in ("sgx", "tdx"):
        with pytest.raises(TsqpError, match=f"--attestation {choice}"):
            sources.select(choice, gramine=absent, tsm=absent)
    gramine = tmp_path / "attestation"  # Gramine's pseudo-files, played by plain files
    gramine.mkdir()
    (gramine / "attestation_type").write_text("dcap")
    (gramine / "quote").write_bytes(b"q" * 1000)
    source = sources.select("auto", gramine=gramine, tsm=absent)
    assert isinstance(source, sources.GramineSgx)
    assert source.quote(b"r" * 64) == b"q" * 1000 and (gramine / "user_report_data").read_bytes() == b"r" * 64
    (gramine / "attestation_type").write_text("none")  # gramine-direct, or sgx.remote_attestation = "none"
    assert isinstance(sources.select("auto", gramine=gramine, tsm=absent), sources.NoQuotes)
    (tmp_path / "tsm").mkdir()
    assert isinstance(sources.select("auto", gramine=gramine, tsm=tmp_path / "tsm"), sources.TdxConfigfs)


def test_settings_parse():
    assert parse_settings("private=true, verify=false,pad_bits=20") == {
        "private": True,
        "verify": False,
        "pad_bits": 20,
    }
    assert parse_settings(None) == {}
    with pytest.raises(TsqpError, match="NAME=VALUE"):
        parse_settings("private")


def test_a_quote_binds_only_a_key_made_in_the_process():
    from tsqp.api.serve import quote_source
    from tsqp.options import ApiOptions

    with pytest.raises(TsqpError, match="--attestation sgx needs --tls"):
        quote_source(ApiOptions(run=None, attestation="sgx"))
    assert isinstance(quote_source(ApiOptions(run=None, attestation="auto")), sources.NoQuotes)  # plain HTTP


def test_a_gguf_files_sha256_joins_the_models_identity(tmp_path):
    from tsqp.cli import model_file

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    assert model_file(str(gguf)) == gguf and model_file("tiny") is None and model_file(None) is None
    claims = make_claims("ab" * 32, model_file(str(gguf)), private=False, verify=True, pad_bits=20)
    assert claims["model"]["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert claims["settings"] == {"private": False, "verify": True, "pad_bits": None}  # pads only in private mode
    by_file = Expectation(mrenclave="x", model=claims["model"]["gguf_sha256"])

    check_claims(claims, by_file)  # the GGUF's sha256 names the model as well as the fingerprint


def test_collateral_fetched_from_a_pccs_url(world, tmp_path):
    evidence, cert_der = served(world, tmp_path)
    with pccs(world) as url:
        verified = verify_evidence(evidence, cert_der, url, EXPECT, root_ca_der=world.root_der)
        assert verified.facts.tcb_status == "UpToDate"
        missing = refusal(
            lambda: verify_evidence(evidence, cert_der, url + "/nothing", EXPECT, root_ca_der=world.root_der)
        )
        assert missing.startswith(f"cannot fetch the collateral from {url}/nothing (")


def test_a_platform_that_cannot_quote_fails_in_one_line(tmp_path):
    with pytest.raises(TsqpError, match="cannot get an SGX quote from"):
        sources.GramineSgx(tmp_path / "absent").quote(b"r" * 64)
    (tmp_path / "tsm").mkdir()  # a plain folder: its report entry has no provider file
    with pytest.raises(TsqpError, match="cannot get a TDX quote from"):
        sources.TdxConfigfs(tmp_path / "tsm").quote(b"r" * 64)
