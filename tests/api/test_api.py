"""`tsqp api` as a real subprocess, driven by the official `openai` client (and raw HTTP for the errors).

The model is the `tiny` preset (random weights, a real BPE tokenizer and chat template): what is
checked is the protocol, the equality with `tsqp generate`, concurrency and the failure modes; the
real model's answers through the API are in tests/system/test_real_model.py.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_port, run_tsqp
from support import api_process

openai = pytest.importorskip("openai")

KEY = "test-key-123"


@pytest.fixture(scope="module")
def api():
    with api_process("--model", "tiny", "--api-key", KEY, "--parallel", "4") as (url, process, lines):
        yield url


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(url: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict | str]:
    request = urllib.request.Request(url + path, data=body, method="POST" if body is not None else "GET")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def cli_generate(*args: str) -> dict:
    result = run_tsqp("generate", "--model", "tiny", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- the protocol ------------------------------------------------------------------------------------


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_equals_tsqp_generate(client):
    expected = cli_generate("--prompt", "the model", "--max-new-tokens", "12")
    reply = client.completions.create(model="tiny", prompt="the model", max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected["text"]
    assert reply.usage.prompt_tokens == len(expected["prompt_ids"])
    assert reply.usage.completion_tokens == len(expected["generated_ids"])
    assert reply.choices[0].finish_reason == ("length" if expected["stop_reason"] == "length" else "stop")
    streamed = client.completions.create(model="tiny", prompt="the model", max_tokens=12, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_chat_equals_tsqp_generate_chat(client):
    expected = cli_generate("--prompt", "what is the key", "--chat", "--max-new-tokens", "10")
    messages = [{"role": "user", "content": "what is the key"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.prompt_tokens == len(expected["prompt_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_sse_ends_with_done(api):
    body = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 3, "temperature": 0, "stream": True})
    request = urllib.request.Request(api + "/v1/completions", data=body.encode(), method="POST")
    request.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_seeded_sampling_repeats_and_top_p(client):
    def sample(seed):
        return (
            client.completions.create(
                model="tiny", prompt="the secret", max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="tiny", prompt="the model", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    assert stop and full.find(stop) >= 0
    cut = full[: full.find(stop)]
    reply = client.completions.create(model="tiny", prompt="the model", max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="the model", max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_eight_concurrent_streams_each_get_what_they_get_alone(client):
    prompts = [f"the {word} model" for word in "key value query token cache layer trusted server".split()]

    def streamed(prompt: str) -> str:
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    alone = [streamed(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone
    assert len(set(alone)) > 1


def test_fixed_arena_name_gives_each_slot_its_own_arena():
    """--arena-name (a Gramine manifest fixes it): thread slot k maps NAME.k, so concurrent slots never share one
    (batched slots share one link: test_batched_slots.py)."""
    name = f"tsqp-test-slots-{time.monotonic_ns()}"
    prompts = ["the key model", "the value model", "the query model", "the token model"]
    with api_process("--model", "tiny", "--parallel", "2", "--slots", "threads", "--arena-name", name) as (url, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

        def complete(prompt: str) -> str:
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text

        alone = [complete(p) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(complete, prompts))
        arenas = sorted(path.name for path in Path("/dev/shm").glob(f"{name}*"))
    assert together == alone
    assert arenas == [f"{name}.0", f"{name}.1"]
    assert not list(Path("/dev/shm").glob(f"{name}*"))  # removed when the API stopped


def test_max_completion_tokens(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens <= 3


# -- errors ------------------------------------------------------------------------------------------


def assert_error(status: int, body, expected_status: int, fragment: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert fragment in body["error"]["message"], body


def test_malformed_json_is_400(api):
    status, body = raw(api, "/v1/completions", b"{not json")
    assert_error(status, body, 400, "not valid JSON")


@pytest.mark.parametrize(
    "field, fragment",
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"n": 2}, "n=2"),
        ({"stop": [1, 2]}, "stop"),
        ({"prompt": {"x": 1}}, "prompt"),
        ({"prompt": [99999]}, "token ids"),
    ],
)
def test_bad_fields_are_400(api, field, fragment):
    status, body = raw(api, "/v1/completions", json.dumps({"model": "tiny", "prompt": "a", **field}).encode())
    assert_error(status, body, 400, fragment)
    assert body["error"]["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_400(api):
    long_prompt = json.dumps({"model": "tiny", "prompt": [i % 500 for i in range(5000)]}).encode()
    status, body = raw(api, "/v1/completions", long_prompt)
    assert_error(status, body, 400, "context")
    assert body["error"]["code"] == "context_length_exceeded"
    status, body = raw(
        api, "/v1/completions", json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 9999}).encode()
    )
    assert_error(status, body, 400, "context")


def test_missing_or_wrong_key_is_401(api, client):
    status, body = raw(api, "/v1/models", key=None)
    assert_error(status, body, 401, "API key")
    status, body = raw(api, "/v1/completions", b"{}", key="wrong")
    assert_error(status, body, 401, "API key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_model_is_404(api, client):
    status, body = raw(api, "/v1/chat/completions", json.dumps({"model": "gpt-4", "messages": []}).encode())
    assert_error(status, body, 404, "gpt-4")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")
    status, body = raw(api, "/v1/nothing-here")
    assert_error(status, body, 404, "Not Found")


def test_health_and_metrics(api, client):
    client.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=0)
    with urllib.request.urlopen(api + "/health", timeout=30) as response:  # no key needed, as in vLLM
        assert json.loads(response.read()) == {"status": "ok"}
    with urllib.request.urlopen(api + "/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['tsqp:generation_tokens_total{model_name="tiny"}'] >= 4
    assert samples['tsqp:prompt_tokens_total{model_name="tiny"}'] >= 1
    assert samples['tsqp:time_to_first_token_seconds_count{model_name="tiny"}'] >= 1
    assert samples['tsqp:time_per_output_token_seconds_count{model_name="tiny"}'] >= 3
    assert samples['tsqp:http_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert "# TYPE tsqp:e2e_request_latency_seconds histogram" in text


def metric(api: str, name: str) -> float:
    with urllib.request.urlopen(api + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("slots", ["threads", "processes", "batched"])
def test_a_client_gone_mid_stream_frees_its_slot_at_once(tmp_path, slots):
    """One slot: a long stream dropped after a few chunks must not keep the next request waiting."""
    with api_process("--model", "tiny", "--parallel", "1", "--slots", slots) as (url, process, lines):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        started = time.perf_counter()
        stream = client.completions.create(model="tiny", prompt="the", max_tokens=3000, temperature=0, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # the HTTP connection closes mid-stream
        deadline = time.monotonic() + 20
        while metric(url, "tsqp:num_requests_running") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(url, "tsqp:num_requests_running") == 0
        reply = client.completions.create(model="tiny", prompt="the", max_tokens=2, temperature=0)
        elapsed = time.perf_counter() - started
        assert reply.usage.completion_tokens == 2
        assert metric(url, "tsqp:generation_tokens_total") < 1000  # the dropped stream did not run on
        assert elapsed < 60, f"the next request waited {elapsed:.1f} s"


def test_a_gone_gpu_server_is_503(tmp_path):
    endpoint = f"ipc://{tmp_path}/server.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "tsqp", "serve", "--model", "tiny", "--listen", endpoint],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "server.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with api_process("--model", "tiny", "--connect", endpoint, "--timeout", "5", "--connect-timeout", "5") as (
            url,
            _,
            _,
        ):
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            assert client.completions.create(model="tiny", prompt="the", max_tokens=2).usage.completion_tokens == 2
            server.kill()
            server.wait()
            with pytest.raises(openai.APIStatusError) as caught:
                client.completions.create(model="tiny", prompt="the", max_tokens=2)
            assert caught.value.status_code == 503
            assert "unreachable" in caught.value.body["message"] if isinstance(caught.value.body, dict) else True
    finally:
        server.kill()
        server.wait()


# -- TLS ---------------------------------------------------------------------------------------------


def test_tls_with_a_key_made_at_start_and_the_certificate_pinned(tmp_path):
    cert = tmp_path / "api-cert.pem"
    keys_before = set(Path(tempfile.gettempdir()).glob("tsqp-api-*.key"))
    with api_process("--model", "tiny", "--tls", "--tls-cert-out", cert) as (url, process, lines):
        assert url.startswith("https://")
        assert cert.is_file() and b"BEGIN CERTIFICATE" in cert.read_bytes()
        assert set(Path(tempfile.gettempdir()).glob("tsqp-api-*.key")) == keys_before  # the sealed key is gone
        pinned = ssl.create_default_context(cafile=str(cert))
        client = openai.OpenAI(
            base_url=url + "/v1", api_key="none", max_retries=0, http_client=openai.DefaultHttpxClient(verify=pinned)
        )
        assert client.completions.create(model="tiny", prompt="the", max_tokens=3, temperature=0).usage
        unpinned = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIConnectionError):  # the system's CAs do not vouch for it
            unpinned.models.list()
        with pytest.raises((OSError, http.client.HTTPException)):  # nor is plain HTTP answered
            urllib.request.urlopen(url.replace("https://", "http://") + "/health", timeout=10)


def test_plain_http_on_a_public_host_is_refused():
    result = run_tsqp("api", "--model", "tiny", "--host", "0.0.0.0", "--port", str(free_port()), timeout=60)
    assert result.returncode == 1
    assert "--tls" in result.stderr and "--insecure-http" in result.stderr
    assert "Traceback" not in result.stderr


def test_insecure_http_and_operator_certificates_pass_the_check(tmp_path):
    from tsqp.api.serve import check_options
    from tsqp.errors import TsqpError
    from tsqp.options import ApiOptions, RunOptions

    run = RunOptions(model_dir=tmp_path)
    check_options(ApiOptions(run=run, name="m", host="0.0.0.0", insecure_http=True))
    check_options(ApiOptions(run=run, name="m", host="::1"))
    with pytest.raises(TsqpError, match="go together"):
        check_options(ApiOptions(run=run, name="m", tls_cert=tmp_path / "c.pem"))


# -- private mode ------------------------------------------------------------------------------------


def test_private_mode_answers_as_tsqp_generate_private(tmp_path):
    """--private through the API: each slot masks its own linears; concurrent answers equal the CLI's."""
    prompts = ["the model", "the secret key", "a trusted enclave"]
    expected = [
        cli_generate("--prompt", p, "--max-new-tokens", "6", "--private", "--pads-dir", tmp_path / "cli")["text"]
        for p in prompts
    ]
    with api_process(
        "--model", "tiny", "--private", "--pads-dir", tmp_path / "api", "--parallel", "2", "--slots", "processes"
    ) as (
        url,
        _,
        lines,
    ):
        assert any("private mode" in line for line in lines)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

        def answer(prompt: str) -> str:
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(answer, prompts)) == expected


# -- streamed text -----------------------------------------------------------------------------------


class CharTokenizer:
    """Token i decodes to chr(i); 0xFFFD stands for a token that ends inside a character."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("stop", [["END"], ["xyz", "ND"], []])
def test_text_pieces_never_send_past_a_stop_string(stop):
    from tsqp.api.text import TextPieces

    text = "hello wEND there"
    pieces = TextPieces(CharTokenizer(), stop)
    sent = "".join(pieces.push(ord(c)) for c in text) + pieces.finish()
    cuts = [text.find(s) for s in stop if text.find(s) >= 0]
    expected = text[: min(cuts)] if cuts else text
    assert sent == expected and pieces.stopped == bool(cuts)


def test_text_pieces_hold_back_a_possible_stop_until_it_cannot_be_one():
    from tsqp.api.text import TextPieces

    pieces = TextPieces(CharTokenizer(), ["abc"])
    assert [pieces.push(ord(c)) for c in "xab"] == ["x", "", ""]
    assert pieces.push(ord("d")) == "abd"  # "abd" cannot begin "abc" any more
    assert pieces.finish() == ""
