"""The TEE side under Gramine's LibOS for real: gramine/Makefile builds the manifest and `make direct` runs
`tsqp generate` on SmolLM2 under gramine-direct against a `tsqp serve` on the host, over tcp with the
arena in /dev/shm (untrusted_shm) and over tcp alone; `make SGX=1` signs with a test key and MRENCLAVE
comes out the same from two builds; `tsqp api --tls` in the enclave answers the openai client on the host,
and, with no SGX under gramine-direct, reports no attestation, which `tsqp.attest.client.attest` refuses;
private mode runs with its pool key as a Gramine encrypted file.

gramine-direct runs the LibOS without SGX: the manifest, mounts, Python paths and native libraries are
exercised, and Gramine 1.9 refuses to open a file missing from the trusted and allowed files even here.
The shm run also records Gramine's trace log, and every file the enclave opened is checked against the
manifest: trusted, or one of the allowed files, which are only the arena. Skipped without Gramine
(`bash ../shared/gramine/install.sh` installs it into /opt/gramine).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ORIGINAL_CACHE, free_port, kill_process, wait_for
from test_gramine_manifest import tomllib

GRAMINE_DIR = Path(__file__).resolve().parents[2] / "gramine"
GRAMINE_BIN = os.path.dirname(shutil.which("gramine-direct") or "/opt/gramine/bin/gramine-direct")
PRESET = "smollm2-135m-instruct"
FRANCE = "What is the capital of France?"
RUN_TIMEOUT = 300  # a run takes about a minute on 2 cores, most of it the LibOS loading torch
ARENA = "tsqp-gramine-test-arena"

pytestmark = pytest.mark.skipif(
    not os.access(os.path.join(GRAMINE_BIN, "gramine-direct"), os.X_OK),
    reason="Gramine is not installed (bash ../shared/gramine/install.sh): no gramine-direct runs",
)

# A successful openat in Gramine's trace log: ---- openat(AT_FDCWD, "/path", FLAGS, MODE) = 0x3
OPENED = re.compile(r'---- openat\(AT_FDCWD, "([^"]+)", ([^,]+), \d+\) = (-?\w+)')


def gramine_env() -> dict:
    tools = glob.glob(os.path.join(os.path.dirname(GRAMINE_BIN), "lib", "python3*", "site-packages"))
    path = [*tools, os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PATH": f"{GRAMINE_BIN}:{os.environ['PATH']}",
        "PYTHONPATH": ":".join(p for p in path if p),
        "TSQP_CACHE": ORIGINAL_CACHE,
    }


@pytest.fixture(scope="module")
def smol() -> Path:
    from tsqp.model.sources import resolve_model

    mp = pytest.MonkeyPatch()
    mp.setenv("TSQP_CACHE", ORIGINAL_CACHE)
    try:
        return Path(resolve_model(PRESET))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def server(smol):
    """`tsqp serve` on the host, on a tcp port: the endpoint."""
    port = free_port()
    command = [sys.executable, "-m", "tsqp", "serve", "--model", str(smol), "--listen", f"tcp://127.0.0.1:{port}"]
    process = subprocess.Popen(command, env=gramine_env(), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    assert wait_for(listening, timeout=120), "tsqp serve did not start listening"
    yield f"tcp://127.0.0.1:{port}"
    kill_process(process)


def make(build: Path, *args: str) -> subprocess.CompletedProcess:
    """gramine/Makefile in a copy of gramine/ (its outputs stay out of the checkout)."""
    if not build.exists():
        build.mkdir(parents=True)
        for source in (GRAMINE_DIR / "Makefile", *GRAMINE_DIR.glob("*.template"), *GRAMINE_DIR.glob("*.py")):
            shutil.copy(source, build)
    command = ["make", "-s", "-C", str(build), f"PYTHON={sys.executable}", *args]
    return subprocess.run(command, env=gramine_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)


def generate(tmp_path: Path, smol: Path, server: str, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    tee_args = f"generate,--chat,--prompt,{FRANCE},--max-new-tokens,24,--json"
    done = make(tmp_path / "build", f"MODEL={smol}", f"SERVER={server}", f"TEE_ARGS={tee_args}", *args, "direct")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "Paris" in out["text"], out["text"]
    assert out["stop_reason"] == "eos"
    return out, done


def covered(path: str, entries: list[str]) -> bool:
    return any(path == e or (e.endswith("/") and path.startswith(e)) for e in entries)


def host_path(path: str, mounts: list[dict]) -> str:
    """The host file behind an enclave path, through the deepest mount above it (/lib is Gramine's glibc)."""
    above = [m for m in mounts if m.get("uri", "").startswith("file:") and covered(path, [m["path"].rstrip("/") + "/"])]
    if not above:
        return path
    mount = max(above, key=lambda m: len(m["path"]))
    return mount["uri"].removeprefix("file:") + path[len(mount["path"]) :]


def test_generate_over_shm_opens_only_manifest_files(tmp_path, smol, server):
    _, done = generate(tmp_path, smol, server, f"ARENA={ARENA}", "GRAMINE_LOG_LEVEL=trace")
    manifest = tomllib.loads((tmp_path / "build" / "tsqp-tee.manifest").read_text())
    trusted = [t["uri"].removeprefix("file:") for t in manifest["sgx"]["trusted_files"]]
    allowed = [uri.split(":", 1)[1] for uri in manifest["sgx"]["allowed_files"]]
    assert allowed == [f"/dev/shm/{ARENA}"]  # nothing else unchecked: no code, no weights

    opened, refused = set(), set()
    for path, flags, result in OPENED.findall(done.stderr):
        if "O_DIRECTORY" in flags or result == "-2":  # folder listings, look-ups of absent files
            continue
        (refused if result.startswith("-") else opened).add(path)
    pseudo = ("/dev/", "/proc/", "/sys/", "/tmp/")  # the LibOS's own files and the in-enclave tmpfs
    files = {host_path(os.path.normpath(p), manifest["fs"]["mounts"]) for p in opened if not p.startswith(pseudo)}
    unlisted = {p for p in files if not os.path.isdir(p) and not covered(p, trusted)}
    assert not unlisted, f"opened but not in the manifest: {sorted(unlisted)[:20]}"
    assert f"/dev/shm/{ARENA}" in opened and str(smol / "model.safetensors") in opened
    # Refused opens (EACCES): only importlib.metadata reading the metadata of packages outside tsqp's
    # dependencies, which it skips.
    assert {p for p in refused if ".dist-info/" not in p} == set()


def test_generate_over_tcp_alone(tmp_path, smol, server):
    generate(tmp_path, smol, server, "TRANSPORT=zmq")
    manifest = tomllib.loads((tmp_path / "build" / "tsqp-tee.manifest").read_text())
    assert manifest["sgx"]["allowed_files"] == []
    assert manifest["loader"]["argv"][manifest["loader"]["argv"].index("--transport") + 1] == "zmq"


def test_signed_measurement_is_reproducible(tmp_path, smol):
    key = tmp_path / "test-key.pem"
    done = subprocess.run(["gramine-sgx-gen-private-key", str(key)], env=gramine_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    measured = []
    for build in ("one", "two"):
        done = make(tmp_path / build, f"MODEL={smol}", "SGX=1", f"SGX_SIGNER_KEY={key}")
        assert done.returncode == 0, done.stderr[-3000:]
        mrenclave = (tmp_path / build / "tsqp-tee.mrenclave").read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{64}", mrenclave)
        assert f"MRENCLAVE {mrenclave}" in done.stdout
        measured.append(mrenclave)
    assert measured[0] == measured[1]


def test_private_mode_with_the_pool_key_encrypted(tmp_path, smol, server):
    """Pad pools in a host folder (not /tmp: the enclave's /tmp is its own tmpfs), the pool key a Gramine
    encrypted file: the host holds only its ciphertext."""
    pads = Path(tempfile.mkdtemp(prefix="tsqp-gramine-pads-", dir="/var/tmp"))
    try:
        generate(tmp_path, smol, server, "PRIVATE=1", f"PADS_DIR={pads}")
        manifest = tomllib.loads((tmp_path / "build" / "tsqp-tee.manifest").read_text())
        assert manifest["sgx"]["allowed_files"] == ["dev:/dev/shm/tsqp-enclave-arena", f"file:{pads}/"]
        sealed = (pads / "pool.key").read_bytes()
        assert len(sealed) > 32  # Gramine's encrypted-file format, not the raw 32-byte key
    finally:
        shutil.rmtree(pads, ignore_errors=True)


def test_api_with_tls_answers_the_openai_client_outside(tmp_path, smol, server):
    """`tsqp api --tls` in the enclave (its key made inside), the openai client on the host pinning the
    certificate the enclave presents (under SGX, RA-TLS would vouch for it: no attestation here, and the
    endpoint says so; an attested client refuses it)."""
    openai = pytest.importorskip("openai")
    from support import LISTENING

    port = free_port()
    # Two batched slots (the default): the batch model's one link maps NAME.0, the one arena listed.
    tee_args = f"api,--tls,--parallel,2,--port,{port},--served-model-name,{PRESET}"
    build = tmp_path / "build"
    make(build, f"MODEL={smol}", f"SERVER={server}", f"TEE_ARGS={tee_args}", "tsqp-tee.manifest")
    command = ["make", "-s", "-C", str(build), f"PYTHON={sys.executable}", f"MODEL={smol}", f"SERVER={server}"]
    command += [f"TEE_ARGS={tee_args}", "direct"]
    process = subprocess.Popen(
        command, env=gramine_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # gramine-direct hands the enclave's stderr to the host's stdout
    lines: list[str] = []
    try:
        timer = threading.Timer(RUN_TIMEOUT, os.killpg, (process.pid, signal.SIGKILL))
        timer.start()
        url = None
        for line in process.stdout:
            lines.append(line)
            if match := LISTENING.search(line):
                url = match.group(1)
                break
        timer.cancel()
        assert url and url.startswith("https://"), "".join(lines)[-3000:]
        cert = tmp_path / "enclave-cert.pem"
        cert.write_text(ssl.get_server_certificate(("127.0.0.1", port)))
        client = openai.OpenAI(
            base_url=url + "/v1",
            api_key="none",
            max_retries=0,
            timeout=RUN_TIMEOUT,
            http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert))),
        )

        def ask(_) -> str:
            reply = client.chat.completions.create(
                model=PRESET, messages=[{"role": "user", "content": FRANCE}], max_tokens=24, temperature=0
            )
            return reply.choices[0].message.content

        with ThreadPoolExecutor(2) as pool:  # both slots at once, in the same steps
            answers = list(pool.map(ask, range(2)))
        assert "Paris" in answers[0] and answers[1] == answers[0]
        manifest = tomllib.loads((build / "tsqp-tee.manifest").read_text())
        assert manifest["sgx"]["allowed_files"] == ["dev:/dev/shm/tsqp-enclave-arena.0"]
        assert "not attested" in lines[-1]
        from tsqp.attest.client import attest
        from tsqp.attest.verify import Expectation, Refused

        with pytest.raises(Refused, match=r"^the server reports no attestation \(tee: none\)"):
            attest(url, Expectation(mrenclave="00" * 32), str(tmp_path / "collateral.json"))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
