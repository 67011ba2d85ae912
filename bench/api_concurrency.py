"""Concurrent streamed chat requests against one `tsqp api`: aggregate tokens/s by the number of streams.

    python bench/api_concurrency.py [--model smollm2-135m-instruct] [--streams 1,2,4,8] [--max-tokens 24]
                                    [--rounds 2] [--slots batched,threads] [--json FILE] [-- API FLAGS...]

Starts one `tsqp api --port 0 --parallel max(streams) --slots KIND` per kind of `--slots` (and the flags
after `--`), warms every slot up with one request each, then for each N runs N streamed chat completions
at once (`stream_options.include_usage`, greedy, distinct prompts), `--rounds` times, the kinds taking
turns round by round (on a shared host the load drifts; turns put both kinds under the same). A
stream's tokens are its usage's completion tokens; the aggregate is all streams' tokens over the wall
time from the first request sent to the last stream closed. Prints each kind's curve and each N's
aggregate over one stream's of the same kind.
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
    parser.add_argument("--slots", default="batched,threads", help="`tsqp api --slots` kinds, comma-separated")
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
    counts, kinds = [int(n) for n in args.streams.split(",")], args.slots.split(",")
    apis = {}
    try:
        for kind in kinds:
            apis[kind] = start_api(args.model, max(counts), ["--slots", kind, *args.api_args])
        models = {kind: served_model(url) for kind, (url, _) in apis.items()}
        for kind, (url, _) in apis.items():
            at_once(url, models[kind], max(counts), 4, round_=-1)  # every slot opened and warm
        runs = {kind: {n: [] for n in counts} for kind in kinds}
        for n in counts:
            for r in range(args.rounds):
                for kind, (url, _) in apis.items():
                    runs[kind][n].append(at_once(url, models[kind], n, args.max_tokens, r))
    finally:
        for _, process in apis.values():
            process.terminate()
            process.wait(timeout=30)
    figures = {"model": args.model, "max_tokens": args.max_tokens, "api_args": args.api_args}
    figures["curves"] = {kind: curve(runs[kind]) for kind in kinds}
    print(f"{'slots':>10} {'streams':>8} {'tokens':>7} {'wall s':>8} {'tokens/s':>9} {'x one':>6}")
    for kind, points in figures["curves"].items():
        for c in points:
            row = f"{kind:>10} {c['streams']:>8} {c['tokens']:>7} {c['wall_s']:>8.2f} {c['tokens_per_s']:>9.1f}"
            print(f"{row} {c['ratio_to_one']:>6.2f}")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(figures, handle, indent=2)


def curve(runs: dict[int, list[dict]]) -> list[dict]:
    """Per number of streams: tokens and wall time over its rounds, tokens/s, and its ratio to one stream's."""
    points = []
    for n, rounds in runs.items():
        tokens, wall = sum(r["tokens"] for r in rounds), sum(r["wall_s"] for r in rounds)
        points.append({"streams": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "rounds": rounds})
    one = next((p["tokens_per_s"] for p in points if p["streams"] == 1), points[0]["tokens_per_s"])
    for p in points:
        p["ratio_to_one"] = p["tokens_per_s"] / one
    return points


if __name__ == "__main__":
    main()
