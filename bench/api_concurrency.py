"""Concurrent streamed chat requests against one `tsqp api`: aggregate tokens/s by the number of streams.

    python bench/api_concurrency.py [--model smollm2-135m-instruct] [--streams 1,2,4,8] [--max-tokens 24]
                                    [--rounds 2] [--json FILE] [-- API FLAGS...]

Starts `tsqp api --port 0 --parallel max(streams)` (and the flags after `--`, e.g. `--slots threads`),
warms every slot up with one request each, then for each N runs N streamed chat completions at once
(`stream_options.include_usage`, greedy, distinct prompts), `--rounds` times. A stream's tokens are its
usage's completion tokens; the aggregate is all streams' tokens over the wall time from the first request
sent to the last stream closed. Prints the curve and each N's aggregate over one stream's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

LISTENING = re.compile(r"tsqp api: (https?://\S+)/v1 serves")
PROMPTS = [
    "Name a city in {}.",
    "Write one sentence about the number {}.",
    "What is {} plus {}?",
    "Give me a word that rhymes with {}.",
]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--streams", default="1,2,4,8", help="numbers of concurrent streams, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each number of streams")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("api_args", nargs="*", help="more `tsqp api` flags, after --")
    return parser.parse_args()


def start_api(model: str, parallel: int, extra: list[str]) -> tuple[str, subprocess.Popen]:
    command = [sys.executable, "-m", "tsqp", "api", "--model", model, "--port", "0", "--parallel", str(parallel)]
    process = subprocess.Popen([*command, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if match := LISTENING.search(line):
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return match.group(1), process
    raise SystemExit("tsqp api did not start:\n" + "".join(lines))


def served_model(url: str) -> str:
    """The id the API serves its model under (GET /v1/models)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("GET", "/v1/models")
    models = json.loads(connection.getresponse().read())
    connection.close()
    return models["data"][0]["id"]


def stream(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion: its completion tokens, chunks, and seconds to first and last chunk."""
    parts = urlsplit(url)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    chunks, first, usage = 0, None, None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        if event.get("usage"):
            usage = event["usage"]
        if event.get("choices") and event["choices"][0]["delta"].get("content"):
            chunks += 1
            first = first if first is not None else time.perf_counter() - start
    connection.close()
    return {"tokens": usage["completion_tokens"], "chunks": chunks, "first_s": first, "s": time.perf_counter() - start}


def at_once(url: str, model: str, n: int, max_tokens: int, round_: int) -> dict:
    """n streams started together; the aggregate tokens/s over the wall time of all of them."""
    results: list[dict | Exception | None] = [None] * n

    def one(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)].format(100 * round_ + i, i + 7)
        try:
            results[i] = stream(url, model, prompt, max_tokens)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failed := [r for r in results if not isinstance(r, dict)]:
        raise SystemExit(f"{len(failed)} of {n} streams failed: {failed[0]!r}")
    tokens = sum(r["tokens"] for r in results)
    return {"streams": n, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "each": results}


def main() -> None:
    args = arguments()
    counts = [int(n) for n in args.streams.split(",")]
    url, process = start_api(args.model, max(counts), args.api_args)
    try:
        model = served_model(url)
        at_once(url, model, max(counts), 4, round_=-1)  # every slot opened and warm
        runs = {n: [at_once(url, model, n, args.max_tokens, r) for r in range(args.rounds)] for n in counts}
    finally:
        process.terminate()
        process.wait(timeout=30)
    curve = []
    for n, rounds in runs.items():
        tokens, wall = sum(r["tokens"] for r in rounds), sum(r["wall_s"] for r in rounds)
        curve.append({"streams": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "rounds": rounds})
    one = next((c["tokens_per_s"] for c in curve if c["streams"] == 1), curve[0]["tokens_per_s"])
    print(f"{'streams':>8} {'tokens':>7} {'wall s':>8} {'tokens/s':>9} {'x one':>6}")
    for c in curve:
        c["ratio_to_one"] = c["tokens_per_s"] / one
        row = f"{c['streams']:>8} {c['tokens']:>7} {c['wall_s']:>8.2f} {c['tokens_per_s']:>9.1f}"
        print(f"{row} {c['ratio_to_one']:>6.2f}")
    if args.json_path:
        figures = {"model": args.model, "max_tokens": args.max_tokens, "api_args": args.api_args, "curve": curve}
        with open(args.json_path, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
