"""What one batched decode step costs by its number of rows (`tsqp api --slots batched`), against one
sequence's own decode step, on one real server, in one run.

    python bench/batched_step.py [--model smollm2-135m-instruct] [--rows 1,2,4,8] [--context 64] [--steps 16]
                                 [-- CLIENT FLAGS...]

Starts one `tsqp serve` (as `tsqp generate` would) and two TEE models on it: one sequence decoding by
itself (`--attention tee`: the path of a generation alone), and the batch model (`TeeModel.forward_rows`
over `RowsAttention`). Each of B sequences gets a KV cache of --context random positions; then --steps
steps of each kind, taken in turns. Prints per B: ms a step, ms a row, the step's cost over one
sequence's own step, the throughput over it (rows a step over that cost), and where the TEE's time
went (its ops, in ms a step). The figures are of one run: the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from tsqp.cli import build_parser, resolve_model, run_options
from tsqp.tee.attention import KVCache
from tsqp.tee.compose import ROWS
from tsqp.tee.rows_attention import Segment
from tsqp.tee.runner import open_model, start_server


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--context", type=int, default=64, help="positions already in each sequence's cache")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("client_args", nargs="*", help="more client flags (`tsqp generate`'s), after --")
    return parser.parse_args()


def filled_cache(config, context: int, steps: int, seed: int) -> KVCache:
    cache = KVCache(config, context + steps + 1)
    generator = torch.Generator().manual_seed(seed)
    cache.keys.normal_(generator=generator)
    cache.values.normal_(generator=generator)
    cache.filled = [context] * config.num_layers
    return cache


def main() -> None:
    args = arguments()
    cli = build_parser().parse_args(["generate", "--model", args.model, "--prompt", "-", *args.client_args])
    options = run_options(cli, resolve_model(cli))
    counts = [int(n) for n in args.rows.split(",")]
    with start_server(options) as server:
        with (
            open_model(dataclasses.replace(options, attention="tee"), server=server) as alone,
            open_model(dataclasses.replace(options, attention=ROWS), server=server) as batch,
        ):
            config = alone.config
            alone.ops.open_session(args.context + args.steps + 1)
            alone.forward(torch.arange(args.context) + 100, 0)  # its prompt (the server holds its positions too)
            batch.ops.open_session(max(counts))
            times = {"alone": [], **{n: [] for n in counts}}
            tee_ops = {n: {} for n in counts}
            for step in range(args.steps):
                pos = args.context + step
                start = time.perf_counter()
                alone.forward(torch.tensor([step + 1]), pos)
                times["alone"].append(time.perf_counter() - start)
                for n in counts:
                    if step == 0:
                        tee_ops[n]["caches"] = [filled_cache(config, args.context, args.steps, i) for i in range(n)]
                    batch.ops.attention.segments = [Segment(cache, pos, 1) for cache in tee_ops[n]["caches"]]
                    batch.stats.tee_ops.clear()
                    start = time.perf_counter()
                    batch.forward_rows(torch.arange(1, n + 1), torch.full((n,), pos), torch.arange(n))
                    times[n].append(time.perf_counter() - start)
                    for op, total in batch.stats.tee_ops.items():
                        tee_ops[n].setdefault(op, []).append(total.seconds)
    one = statistics.median(times["alone"])
    print(f"{args.model}, {args.context} positions cached: one sequence's own step {1e3 * one:.1f} ms (median)")
    print(f"{'rows':>5} {'ms/step':>8} {'ms/row':>7} {'x alone':>8} {'rows/s x':>9}  TEE ops, ms a step")
    for n in counts:
        median = statistics.median(times[n])
        ops = {op: statistics.median(v) for op, v in tee_ops[n].items() if op != "caches"}
        top = ", ".join(f"{op} {1e3 * s:.1f}" for op, s in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
        print(
            f"{n:>5} {1e3 * median:>8.1f} {1e3 * median / n:>7.1f} {median / one:>8.2f} {n * one / median:>9.2f}  {top}"
        )


if __name__ == "__main__":
    main()
