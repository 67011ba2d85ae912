"""A short prompt's prefill (an API request's chat turn) under several short-step limits, in turns.

    python bench/short_prompt.py [--model smollm2-135m-instruct] [--tokens 40] [--runs 5] [--short 8,64]
                                 [-- CLIENT FLAGS...]

`tuning.SHORT_STEP_ROWS` decides which steps are short: run on one TEE thread (forward.py), verified at
their end, every layer's checks at once (verify.Verifier.defer_rows), and attended in the TEE under
`--attention decode`. It was 8 (a decode step); this prints a --tokens prefill's time, and its
verification's, under each value of --short, on one server, the values taking turns run by run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tsqp.tee.forward as forward
from tsqp.cli import build_parser, resolve_model, run_options
from tsqp.tee.runner import open_model


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--short", default=f"8,{forward.SHORT_STEP_ROWS}", help="values of SHORT_STEP_ROWS to compare")
    parser.add_argument("client_args", nargs="*", help="more client flags (`tsqp generate`'s), after --")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    cli = build_parser().parse_args(["generate", "--model", args.model, "--prompt", "-", *args.client_args])
    options = run_options(cli, resolve_model(cli))
    rules = {int(rows): {"s": [], "verify": []} for rows in args.short.split(",")}
    with open_model(options) as tee:
        ids = torch.arange(args.tokens) + 100
        for run in range(args.runs + 1):  # the first round warms up
            for rows, figures in rules.items():
                forward.SHORT_STEP_ROWS = rows
                if hasattr(tee.ops.checker, "defer_rows"):
                    tee.ops.checker.defer_rows = rows
                if hasattr(tee.ops.attention, "rows"):
                    tee.ops.attention.rows = rows
                tee.ops.open_session(args.tokens)
                tee.stats.tee_ops.clear()
                start = time.perf_counter()
                tee.forward(ids, 0, last_only=True)
                seconds = time.perf_counter() - start
                tee.ops.close_session()
                if run:
                    figures["s"].append(seconds)
                    verify = tee.stats.tee_ops.get("verify")
                    figures["verify"].append(verify.seconds if verify else 0.0)
    flags = " ".join(args.client_args)
    print(f"{args.model}, a {args.tokens}-token prefill, {args.runs} runs each, in turns ({flags or 'no flags'})")
    print(f"{'short rows':>10} {'median ms':>10} {'range ms':>14} {'verify ms':>10}")
    for rows, figures in rules.items():
        low, high = min(figures["s"]), max(figures["s"])
        median, verify = statistics.median(figures["s"]), statistics.median(figures["verify"])
        print(f"{rows:>10} {1e3 * median:>10.1f} {1e3 * low:>6.1f}-{1e3 * high:<7.1f} {1e3 * verify:>10.1f}")


if __name__ == "__main__":
    main()
