"""Real SGX and TDX quotes (data/, made by Intel hardware) through tsqp's verifier: accepted at a time
inside their collateral's validity, refused with the check's one-line reason otherwise."""

from __future__ import annotations

import calendar
import json
import time
from pathlib import Path

import dcap_qvl
import pytest

from tsqp.attest.evidence import Evidence, measurement
from tsqp.attest.verify import Expectation, Refused, check_platform, verify_evidence, verify_quote

DATA = Path(__file__).resolve().parent / "data"
SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
TDX_MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"


def sample(name: str) -> tuple[bytes, object, int]:
    """The quote, its collateral, and a time one hour after the TCB info was issued."""
    text = (DATA / f"{name}_collateral.json").read_text()
    issued = json.loads(json.loads(text)["tcb_info"])["issueDate"]
    now = calendar.timegm(time.strptime(issued, "%Y-%m-%dT%H:%M:%SZ")) + 3600
    return (DATA / name).read_bytes(), dcap_qvl.QuoteCollateralV3.from_json(text), now


def next_update(collateral) -> int:
    return calendar.timegm(time.strptime(json.loads(collateral.tcb_info)["nextUpdate"], "%Y-%m-%dT%H:%M:%SZ"))


def refusal(call) -> str:
    with pytest.raises(Refused) as caught:
        call()
    reason = str(caught.value)
    assert "\n" not in reason
    return reason


def test_the_real_sgx_quote_verifies_and_its_platform_status_is_read():
    quote, collateral, now = sample("sgx_quote")
    facts = verify_quote(quote, collateral, now)
    assert (facts.tee, facts.tcb_status) == ("sgx", "ConfigurationAndSWHardeningNeeded")
    assert facts.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert facts.measurement["mrenclave"] == SGX_MRENCLAVE and not facts.debug
    allowed = Expectation(mrenclave=SGX_MRENCLAVE.upper(), allow_tcb=("UpToDate", "ConfigurationAndSWHardeningNeeded"))
    check_platform(facts, allowed)  # accepted when the user allows that status


def test_the_real_tdx_quote_verifies_up_to_date():
    quote, collateral, now = sample("tdx_quote")
    facts = verify_quote(quote, collateral, now)
    assert (facts.tee, facts.tcb_status, facts.measurement["mrtd"]) == ("tdx", "UpToDate", TDX_MRTD)
    assert set(facts.measurement) == {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"}
    check_platform(facts, Expectation(mrtd=TDX_MRTD))


# offset of the flipped bit's byte -> the reason; one or more flips in every signed part of the quote
SGX_FLIPS = {
    0: "Unsupported quote version",  # header: version
    2: "Unsupported DCAP attestation key type",  # header: attestation key type
    20: "Unknown QE vendor ID",  # header: QE vendor
    8: "ISV enclave report signature is invalid",  # header: QE SVN (signed with the report)
    96: "ISV enclave report signature is invalid",  # report: attributes
    112: "ISV enclave report signature is invalid",  # report: MRENCLAVE
    176: "ISV enclave report signature is invalid",  # report: MRSIGNER
    368: "ISV enclave report signature is invalid",  # report: report data
    436: "ISV enclave report signature is invalid",  # the report's signature
    500: "QE report hash mismatch",  # the attestation key
    600: "Signature is invalid for qe_report",  # the QE report
    1000: "Signature is invalid for qe_report",  # the QE report's signature
    1200: "Failed to verify certificate chain",  # the PCK certificate
    2000: "Failed to verify certificate chain",  # the PCK certificate's signature
}
TDX_FLIPS = {
    1: "Unsupported quote version",
    4: "Invalid TEE type",
    184: "ISV enclave report signature is invalid",  # MRTD
    568: "ISV enclave report signature is invalid",  # report data
    636: "ISV enclave report signature is invalid",  # the report's signature
    700: "QE report hash mismatch",  # the attestation key
    1000: "Signature is invalid for qe_report",
    1500: "Failed to verify certificate chain",
    3000: "Failed to verify certificate chain",
}


@pytest.mark.parametrize("name, flips", [("sgx_quote", SGX_FLIPS), ("tdx_quote", TDX_FLIPS)])
def test_every_single_bit_flip_in_a_signed_part_is_refused_with_its_reason(name, flips):
    quote, collateral, now = sample(name)
    for offset, reason in flips.items():
        for bit in (0, 7):
            flipped = bytearray(quote)
            flipped[offset] ^= 1 << bit
            message = refusal(lambda quote=bytes(flipped): verify_quote(quote, collateral, now))
            assert message.startswith("the quote failed verification against the collateral ("), message
            if bit == 0:  # bit 7 of a header byte may fail an earlier parse check
                assert reason in message, (offset, message)


@pytest.mark.parametrize("name", ["sgx_quote", "tdx_quote"])
def test_collateral_past_its_next_update_is_refused(name):
    quote, collateral, now = sample(name)
    verify_quote(quote, collateral, now)
    message = refusal(lambda: verify_quote(quote, collateral, next_update(collateral) + 1))
    assert message.endswith("(Verification failed: TCBInfo expired)"), message


def test_a_tdx_quote_whose_tcb_matches_no_level_is_refused():
    quote, collateral, now = sample("tdx_quote_outdated")
    assert "No matching TCB level found" in refusal(lambda: verify_quote(quote, collateral, now))


def test_a_wrong_expected_measurement_is_refused():
    quote, collateral, now = sample("sgx_quote")
    facts = verify_quote(quote, collateral, now)
    allow = ("ConfigurationAndSWHardeningNeeded",)
    message = refusal(lambda: check_platform(facts, Expectation(mrenclave="00" * 32, allow_tcb=allow)))
    assert message == f"MRENCLAVE is {SGX_MRENCLAVE}, expected {'00' * 32}"
    assert "MRSIGNER is" in refusal(lambda: check_platform(facts, Expectation(mrsigner="11" * 32, allow_tcb=allow)))
    assert "--expect-mrenclave" in refusal(lambda: check_platform(facts, Expectation(allow_tcb=allow)))
    tdx = verify_quote(*sample("tdx_quote"))
    assert refusal(lambda: check_platform(tdx, Expectation(mrtd="22" * 48))).startswith("MRTD is " + TDX_MRTD)
    assert "--expect-mrtd" in refusal(lambda: check_platform(tdx, Expectation(mrenclave=SGX_MRENCLAVE)))


def test_a_tcb_status_not_allowed_is_refused():
    quote, collateral, now = sample("sgx_quote")
    facts = verify_quote(quote, collateral, now)
    message = refusal(lambda: check_platform(facts, Expectation(mrenclave=SGX_MRENCLAVE)))
    assert message == (
        "the platform's TCB status is ConfigurationAndSWHardeningNeeded, advisories INTEL-SA-00289, INTEL-SA-00615; "
        "allowed: UpToDate (--allow-tcb ConfigurationAndSWHardeningNeeded if you accept it)"
    )


def test_a_real_quote_over_other_report_data_binds_no_tsqp_key(tmp_path):
    """The sample's report data is "Hello, world!": genuine, but not a commitment to this server's key."""
    from testonly_sgx import TestOnlyDcapWorld

    quote, collateral, now = sample("sgx_quote")
    world = TestOnlyDcapWorld.create(tmp_path)
    cert_der = (tmp_path / "root.der").read_bytes()  # any certificate: its key is not the quoted one
    claims = {"model": {"fingerprint": "f", "gguf_sha256": None}, "settings": {}}
    evidence = Evidence("sgx", quote, b"\0" * 32, claims)
    expect = Expectation(mrenclave=SGX_MRENCLAVE, allow_tcb=("ConfigurationAndSWHardeningNeeded",))
    message = refusal(lambda: verify_evidence(evidence, cert_der, collateral, expect, now))
    assert message.startswith("the quote does not commit to the TLS key this server presented")
    other_root = refusal(lambda: verify_evidence(evidence, cert_der, collateral, expect, now, world.root_der))
    assert other_root.startswith("the quote failed verification")  # Intel's chain does not end at a test root


@pytest.mark.parametrize("name", ["sgx_quote", "tdx_quote"])
def test_the_served_measurement_is_the_one_dcap_qvl_reads(name):
    quote, collateral, now = sample(name)
    assert measurement(quote) == verify_quote(quote, collateral, now).measurement
