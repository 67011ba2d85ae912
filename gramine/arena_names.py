"""Prints the arena files the TEE will open for TEE_ARGS, comma-separated: the manifest allows exactly these.

Run by gramine/Makefile as `python arena_names.py ARENA TEE_ARGS` (TEE_ARGS comma-separated, as the
Makefile takes it). One arena for a single client (`generate`, `logits`...); for `tsqp api`, one per
slot with `--slots threads|processes` (and by default in private mode): ARENA.0 ... ARENA.{parallel-1}
(tsqp/api/slots.py names them so); batched slots (the default otherwise) share the batch model's one
link, which maps ARENA.0 alone. Standalone, without tsqp:
gramine/Makefile runs it with whatever interpreter it is given, and the test keeps DEFAULT_PARALLEL
equal to `tsqp api`'s own default.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_PARALLEL = 4  # `tsqp api --parallel`'s default (tsqp/options.py ApiOptions)


def arena_files(arena: str, tee_args: str) -> list[str]:
    argv = [arg.strip() for arg in tee_args.split(",") if arg.strip()]
    if not argv or argv[0] != "api":
        return [arena]
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL)
    parser.add_argument("--slots", default="auto")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--helper")
    known = parser.parse_known_args(argv[1:])[0]
    slots = known.slots  # auto as tsqp/api/slots.py slots_kind resolves it
    if slots == "auto":
        threads = known.private or known.helper or known.attention in ("server", "decode")
        slots = "threads" if threads else "batched"
    return [f"{arena}.{k}" for k in range(1 if slots == "batched" else known.parallel)]


if __name__ == "__main__":
    print(",".join(arena_files(sys.argv[1], sys.argv[2])))
