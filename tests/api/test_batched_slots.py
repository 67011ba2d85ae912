"""`tsqp api --slots batched`: the concurrent generations' decode steps run as the rows of one forward pass.

Through the real API (a subprocess, the `openai` client): concurrent streams get what each gets alone
and what `--slots threads` gives, the batch model's one link maps one arena (NAME.0, what a Gramine
manifest lists), /metrics shows steps that held several rows, and the modes that cannot be batched are
refused at start with one line.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_tsqp
from support import api_process

openai = pytest.importorskip("openai")

PROMPTS = [f"the {word} model" for word in "key value query token cache layer".split()]


def metric(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def completions(url: str, max_tokens: int = 10) -> tuple[list[str], list[str]]:
    """Each prompt streamed alone, then all at once: (alone, together)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

    def streamed(prompt: str) -> str:
        kwargs = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        return "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, **kwargs))

    alone = [streamed(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(streamed, PROMPTS))
    return alone, together


def test_batched_streams_equal_each_alone_and_the_thread_slots():
    name = f"tsqp-test-batched-{time.monotonic_ns()}"
    with api_process("--model", "tiny", "--parallel", "3", "--slots", "batched", "--arena-name", name) as (url, _, _):
        alone, together = completions(url)
        arenas = sorted(path.name for path in Path("/dev/shm").glob(f"{name}*"))
        steps, rows = metric(url, "tsqp:batched_steps"), metric(url, "tsqp:batched_rows")
    with api_process("--model", "tiny", "--parallel", "3") as (url, _, _):
        threads_alone, _ = completions(url)
    assert together == alone == threads_alone
    assert len(set(alone)) > 1
    assert arenas == [f"{name}.0"]  # the batch model's link, the only one
    assert not list(Path("/dev/shm").glob(f"{name}*"))
    assert steps >= 2 * 10  # each round's prompt and nine decode steps, at least
    assert rows > 2 * len(PROMPTS) * 9  # every prompt row and decode step of both rounds
    assert rows / steps > 1.5  # the concurrent round's steps held several generations' rows


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--private"], "private mode"),
        (["--attention", "server"], "--attention tee"),
        (["--attention", "decode"], "its own cache"),
    ],
)
def test_modes_that_cannot_be_batched_are_refused(flags, fragment):
    result = run_tsqp("api", "--model", "tiny", "--port", "0", "--slots", "batched", *flags, timeout=120)
    assert result.returncode != 0
    assert_one_line_error(result, fragment)
