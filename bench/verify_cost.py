"""What verification adds to a prefill: the same `tsqp bench` with and without checks, paired in each round.

    python bench/verify_cost.py [--model smollm2-135m-instruct] [--tokens 512] [--rounds 5]
                                [--tree LABEL=PATH ...] [--variant LABEL="FLAGS" ...] [--pin]

`tsqp bench` reports the time spent in checks (`verify_s`); a check made while the server computes costs the
prefill less than that (checks.Overlapped, `--pipeline`), or more where the two share cores. This measures
the cost itself: per round and tree, a verified run and an unverified one (`--no-verify`) in turn, and
prints each pair and, per tree and variant (more `tsqp bench` flags, e.g. --variant on="--pipeline on"),
the medians and the median of the paired differences as a share of the verified prefill. --pin: the
server on the last CPU and the TEE on the others (cost_table.py), as a server on a GPU or another host would
leave the TEE's cores to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from cost_table import bench


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", action="append", default=[], help="LABEL=PATH, in the order they run")
    parser.add_argument("--pin", action="store_true", help="the server on the last CPU, the TEE on the others")
    parser.add_argument("--variant", action="append", default=[], help='LABEL="more tsqp bench flags"')
    return parser.parse_args()


def main() -> None:
    args = arguments()
    trees = [tree.split("=", 1) for tree in args.tree] or [["here", os.getcwd()]]
    variants = [variant.split("=", 1) for variant in args.variant] or [["", ""]]
    runs_of = [(f"{label} {name}".strip(), tree, extra.split()) for label, tree in trees for name, extra in variants]
    flags = ["--model", args.model, "--tokens", str(args.tokens), "--decode", "1"]
    out = Path(tempfile.mkdtemp(prefix="verify-cost-"))
    pairs: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in runs_of}
    for round_ in range(args.rounds):
        for label, tree, extra in runs_of:
            path = out / f"{label.replace(' ', '-')}-{round_}"
            runs = [bench(tree, [*flags, *extra, check], Path(f"{path}{check}.json"), args.pin) for check in CHECKS]
            failed = [run for run in runs if isinstance(run, str)]
            if failed:
                sys.exit(f"{label}: {failed[0]}")
            verified, unverified = runs
            pairs[label].append((verified["prefill_s"], unverified["prefill_s"], verified["verify_s"]))
            print(
                f"round {round_} {label}: prefill {verified['prefill_s']:.3f} s verified, "
                f"{unverified['prefill_s']:.3f} s not (checks {verified['verify_s']:.3f} s)",
                flush=True,
            )
    for label, runs in pairs.items():
        verified, unverified, checks = (statistics.median(values) for values in zip(*runs, strict=True))
        cost = statistics.median(v - u for v, u, _ in runs)
        print(
            f"{label}: median prefill {verified:.3f} s verified, {unverified:.3f} s not; checks {checks:.3f} s "
            f"({100 * checks / verified:.1f}%); verification's cost {cost:.3f} s ({100 * cost / verified:.1f}% of "
            f"the verified prefill, median of {len(runs)} paired differences)"
        )


CHECKS = ("--verify", "--no-verify")

if __name__ == "__main__":
    main()
