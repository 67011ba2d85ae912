"""`tsqp api --tls` -> `tsqp verify` -> the pinned openai client, with quotes of the test-only DCAP world
(testonly_sgx.py hands its quote source to `tsqp api` and its root to `tsqp verify`; tsqp's own CLI
trusts Intel's root and refuses these quotes)."""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import run_tsqp
from safetensors.torch import load_file, save_file
from support import api_process
from testonly_sgx import MRENCLAVE, TestOnlyDcapWorld

from tsqp.api.tls import ephemeral
from tsqp.attest.client import attested_openai, pinned_context
from tsqp.attest.verify import Expectation, Refused
from tsqp.model.checkpoint import Checkpoint
from tsqp.model.presets import preset_path

openai = pytest.importorskip("openai")
SCRIPT = Path(__file__).resolve().parent / "testonly_sgx.py"


def verify(world: TestOnlyDcapWorld, url: str, *flags: str) -> subprocess.CompletedProcess:
    """`tsqp verify URL --collateral WORLD --expect-mrenclave M FLAGS`, trusting the world's root."""
    command = [sys.executable, SCRIPT, world.folder, "verify", url, "--collateral", world.collateral]
    command += ["--expect-mrenclave", MRENCLAVE.hex(), *flags]
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=60)


@contextmanager
def impostor(target: str, folder: Path):
    """A TLS proxy that presents its own certificate and relays every byte to target: what a host that
    cannot forge a quote over its own key would do. Yields its https URL."""
    files, _ = ephemeral(folder / "impostor.pem", "127.0.0.1")
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(files.certfile, files.keyfile, password=files.password)
    files.loaded()
    host, port = target.removeprefix("https://").rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))

    def relay(inbound, outbound):
        """Both directions in one thread: an SSL socket must not be read in one thread while another writes
        to it (OpenSSL does not allow it; two pumping threads could hang the relay). Non-blocking reads, as a
        TLS record without application data (a session ticket) leaves nothing to read."""
        peer = {inbound: outbound, outbound: inbound}
        for sock in peer:
            sock.setblocking(False)
        try:
            while True:
                ready = [sock for sock in peer if sock.pending()] or select.select(list(peer), [], [], 120)[0]
                if not ready:
                    return
                for sock in ready:
                    try:
                        data = sock.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        continue
                    if not data:
                        return
                    peer[sock].setblocking(True)
                    peer[sock].sendall(data)
                    peer[sock].setblocking(False)
        except OSError:
            pass
        finally:
            inbound.close()
            outbound.close()

    def serve():
        while True:
            try:
                client, _ = listener.accept()
                inbound = server_side.wrap_socket(client, server_side=True)
            except OSError:
                return
            outbound = ssl._create_unverified_context().wrap_socket(socket.create_connection((host, int(port))))
            threading.Thread(target=relay, args=(inbound, outbound), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return TestOnlyDcapWorld.create(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return preset_path("tiny")


@pytest.fixture(scope="module")
def other_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny preset with other weights (same config and tokenizer): another model."""
    folder = tmp_path_factory.mktemp("other") / "tiny-other"
    shutil.copytree(tiny_model, folder)
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({name: tensor * 1.5 for name, tensor in tensors.items()}, path, metadata={"format": "pt"})
    return folder


def test_attested_api_verified_then_pinned_and_impostors_refused(world, tiny_model, other_model, tmp_path):
    fingerprint = Checkpoint(tiny_model).fingerprint()
    entry = (SCRIPT, world.folder)
    first = api_process(
        "--model", tiny_model, "--tls", "--tls-cert-out", tmp_path / "a.pem", "--api-key", "k", entry=entry
    )
    second = api_process(
        "--model", other_model, "--tls", "--tls-cert-out", tmp_path / "b.pem", "--no-verify", entry=entry
    )
    with first as (url, _, _), second as (other_url, _, _):
        result = verify(world, url, "--expect-model", fingerprint, "--expect-settings", "verify=true,private=false")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"verified: sgx quote, TCB UpToDate, MRENCLAVE {MRENCLAVE.hex()}")
        assert f"fingerprint {fingerprint}" in result.stdout and result.stdout.count("\n") == 1

        client = attested_openai(
            url,
            Expectation(mrenclave=MRENCLAVE.hex(), model=fingerprint),
            str(world.collateral),
            api_key="k",
            root_ca_der=world.root_der,
            max_retries=0,
        )
        answer = client.completions.create(model=client.models.list().data[0].id, prompt="the", max_tokens=3)
        assert answer.usage.completion_tokens > 0 and client.attestation.facts.tcb_status == "UpToDate"

        refused = verify(world, other_url, "--expect-model", fingerprint)  # another model
        assert refused.returncode == 1 and refused.stderr.startswith("tsqp: error: refused: the server runs model ")
        refused = verify(world, other_url, "--expect-settings", "verify=true")  # other settings
        assert refused.stderr.strip() == "tsqp: error: refused: the server runs with verify=False, expected verify=True"
        with impostor(url, tmp_path) as relay:  # another certificate in front of the genuine evidence
            refused = verify(world, relay)
            assert refused.stderr.strip() == (
                "tsqp: error: refused: the quote does not commit to the TLS key this server presented "
                "(report data differs)"
            )
            with pytest.raises(Refused, match="TLS key this server presented"):
                attested_openai(
                    relay, Expectation(mrenclave=MRENCLAVE.hex()), str(world.collateral), root_ca_der=world.root_der
                )
            pinned = openai.OpenAI(
                base_url=relay + "/v1",
                api_key="k",
                max_retries=0,
                http_client=openai.DefaultHttpxClient(verify=pinned_context(result_pin(world, url))),
            )
            with pytest.raises(openai.APIConnectionError):  # the pinned key, not the impostor's
                pinned.models.list()
        intel = run_tsqp("verify", url, "--collateral", world.collateral, "--expect-mrenclave", MRENCLAVE.hex())
        assert intel.returncode == 1 and "refused: the quote failed verification against the collateral" in intel.stderr


def result_pin(world: TestOnlyDcapWorld, url: str) -> str:
    """The certificate `tsqp verify --pin-out` writes for the attested server."""
    pin = world.folder / "pin.pem"
    assert verify(world, url, "--pin-out", pin).returncode == 0
    return pin.read_text()


def test_an_unattested_server_is_refused(tiny_model, tmp_path):
    with api_process("--model", tiny_model, "--tls", "--tls-cert-out", tmp_path / "c.pem") as (url, _, lines):
        assert any("not attested" in line for line in lines)
        result = run_tsqp("verify", url, "--collateral", tmp_path / "none.json", "--expect-mrenclave", "00" * 32)
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "tsqp: error: refused: the server reports no attestation (tee: none): nothing proves what runs there"
        )
        # Without --collateral (Intel's PCS by default, unreachable here): refused all the same, nothing fetched.
        result = run_tsqp("verify", url, "--expect-mrenclave", "00" * 32)
        assert result.returncode == 1 and "refused: the server reports no attestation" in result.stderr
    with api_process("--model", tiny_model) as (url, _, _):  # plain HTTP cannot be attested
        result = run_tsqp("verify", url, "--collateral", tmp_path / "none.json", "--expect-mrenclave", "00" * 32)
        assert result.returncode == 1 and "is not https" in result.stderr


def test_collateral_defaults_to_intels_pcs():
    """`--collateral` is optional (the issue's usage): Intel's PCS, the URL dcap-qvl itself knows."""
    import dcap_qvl

    from tsqp.cli import build_parser

    args = build_parser().parse_args(["verify", "https://127.0.0.1:1", "--expect-mrenclave", "00" * 32])
    assert args.collateral == dcap_qvl.INTEL_PCS_URL
