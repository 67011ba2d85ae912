"""The TEE's floor decode in one process, for A/B runs of two trees: record, then replay with no server.

    PYTHONPATH=TREE python bench/floor_decode.py [--model smollm2-135m-instruct] [--prompt 64] [--new 48]
        [--attention server|tee|decode] [LABEL]

Records one greedy generation through an in-process engine (a Recorder around it), then replays it
(tsqp/measure/replay.py) three times on one TEE thread, verified, and prints the best decode ms a token.
`farm-bench --vs` pairs two trees' runs (PYTHONPATH), so a change to the TEE's per-call work is measured
before and after in one call; `tsqp bench --replay` gives the same floor with the server in its own process.
"""

from __future__ import annotations

import argparse

import torch

from tsqp.measure.replay import Recorder, Recording, Replayer
from tsqp.model.sources import resolve_model
from tsqp.server.engine import Engine
from tsqp.stats import Stats
from tsqp.tee.compose import tee_model
from tsqp.tee.generate import generate
from tsqp.tee.remote import InProcess, Synchronous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=48, help="generated tokens")
    parser.add_argument("--attention", choices=("server", "tee", "decode"), help="where the plain split attends")
    parser.add_argument("label", nargs="?", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = resolve_model(args.model)
    prompt = list(range(100, 100 + args.prompt))
    recording = Recording()
    modes = {"attention": args.attention} if args.attention else {}  # a tree without the flag: its default
    recorded = tee_model(model, Recorder(Synchronous(InProcess(Engine(str(model)))), recording), **modes)
    recorded.attach()
    generate(recorded, prompt, args.new)
    best = float("inf")
    for _ in range(3):
        stats = Stats()
        tee = tee_model(model, Replayer(recording, stats), stats, **modes)
        tee.attach()
        generation = generate(tee, prompt, args.new)
        best = min(best, 1000 * generation.decode_s / generation.decode_tokens)
    print(f"{args.label} floor decode ms/token {best:.2f}".strip())


if __name__ == "__main__":
    main()
