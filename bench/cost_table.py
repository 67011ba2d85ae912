"""Issue 32's table in one run: two trees (before and after a change) through the same `tsqp bench` commands.

    python bench/cost_table.py [--model smollm2-135m-instruct] [--tree before=PATH] [--tree after=PATH]
                               [--rounds 1] [--only plain,bf16,private,...] [--out DIR] [--pin]

For each configuration and round, each tree's run in turn (`PYTHONPATH=TREE python -m tsqp bench ...
--json`), so a drift in the shared host's load falls on both alike. Prints one row per tree and
configuration with the issue's ratios, each measured against transformers (or the plain split) in the
same `tsqp bench` run; the JSON files stay in --out. A configuration that names a flag a tree lacks (an
option added after it) fails on that tree alone and is reported as such.

--pin: a server that does not share the TEE's cores, as a GPU or another host would be: each run starts
the tree's own `tsqp serve` on the last CPU (`taskset`) and the bench on the others (`--connect`), without
`--compare` (transformers would get the TEE's cores only): the split's own figures, before against after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["--tokens", "512", "--decode", "64", "--compare"]
CONFIGS = {
    "plain": ["--replay"],
    "bf16": ["--dtype", "bfloat16"],
    "bf16-tee": ["--dtype", "bfloat16", "--attention", "tee"],
    "private": ["--private"],
    "attention-decode": ["--attention", "decode", "--replay"],
    "attention-tee": ["--attention", "tee", "--replay"],
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tree", action="append", default=[], help="LABEL=PATH, in the order they run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default=",".join(CONFIGS), help="configurations, comma-separated")
    parser.add_argument("--out", default="/tmp/cost_table")
    parser.add_argument("--pin", action="store_true", help="the server on the last CPU, the TEE on the others")
    return parser.parse_args()


def run(label: str, tree: str, name: str, model: str, out: Path, round_: int, pin: bool = False) -> dict | None:
    path = out / f"{name}-{label}-{round_}.json"
    result = bench(tree, ["--model", model, *COMMON, *CONFIGS[name]], path, pin)
    if isinstance(result, str):
        print(f"{name} on {label}: {result}", flush=True)
        return None
    return result


def bench(tree: str, flags: list[str], path: Path, pin: bool = False) -> dict | str:
    """`tsqp bench FLAGS --json PATH` on the tree: its JSON result, or the failure in a line. pin: the tree's own
    `tsqp serve` on the last CPU and the bench on the others (`--compare` dropped: transformers would get the
    TEE's cores only)."""
    tsqp = [sys.executable, "-m", "tsqp"]
    command = [*tsqp, "bench", *flags, "--json", str(path)]
    env = {**os.environ, "PYTHONPATH": tree}
    server = None
    if pin:
        model = flags[flags.index("--model") + 1]
        cpus = sorted(os.sched_getaffinity(0))
        address = f"ipc://{tempfile.mkdtemp()}/server.sock"
        serve = ["taskset", "-c", str(cpus[-1]), *tsqp, "serve", "--model", model, "--listen", address]
        if "--dtype" in flags:  # the server's dtype is the wire's: the bench takes it from the server
            serve += ["--dtype", flags[flags.index("--dtype") + 1]]
        server = subprocess.Popen(serve, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        socket, deadline = Path(address.removeprefix("ipc://")), time.monotonic() + 120
        while not socket.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the server is listening once its socket is there
        tee_cpus = ",".join(map(str, cpus[:-1]))
        command = ["taskset", "-c", tee_cpus, *[c for c in command if c != "--compare"]]
        command += ["--connect", address, "--connect-timeout", "120"]
    try:
        done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)  # -m: the cwd first
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    if done.returncode != 0:
        return f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(path.read_text())


def row(result: dict) -> dict:
    """The issue's figures from one `tsqp bench --json` result (None where the run has no such figure)."""
    decode = result.get("decode", {})
    floor = result.get("floor", {}).get("decode", {})
    return {
        "prefill_s": result["prefill_s"],
        "x_sdpa": result.get("ratio_sdpa"),
        "x_full_tee": (1 / result["speedup_over_full_tee"]) if result.get("speedup_over_full_tee") else None,
        "verify_share": result["verify_s"] / result["prefill_s"] if result.get("verify") else None,
        "decode_ms": decode.get("ms_per_token"),
        "decode_x": decode.get("ratio_ms_per_token"),
        "calls_per_token": decode.get("rpc_calls_per_token"),
        "beyond_compute_us": result.get("tee_cost", {}).get("decode", {}).get("beyond_compute_us"),
        "floor_us_per_call": floor.get("own_us_per_call"),
        "private_x_plain": result.get("ratio_plain"),
        "pads_x_float64": result.get("ratio_pads_float64"),
        "ttft_s": decode.get("ttft_s"),
        "same_tokens": decode.get("same_tokens"),
    }


def show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool | int):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def main() -> None:
    args = arguments()
    trees = [tree.split("=", 1) for tree in args.tree] or [["here", os.getcwd()]]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only.split(","):
        for round_ in range(args.rounds):
            for label, tree in trees:
                result = run(label, tree, name, args.model, out, round_, args.pin)
                if result is not None:
                    rows.append({"config": name, "tree": label, "round": round_, **row(result)})
                    print(json.dumps(rows[-1]), flush=True)
    columns = list(rows[0]) if rows else []
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(show(r[c]) if not isinstance(r[c], str) else r[c] for c in columns) + " |")
    (out / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
