"""Which tsqp files one decode token passes through, and how many times each is entered.

    python bench/walk.py [--private] [--no-verify] [--tokens N]

Builds the `tiny` preset, runs the server's engine in this process (the in-process twin, so the server's
files are traced too), prefills N tokens, then traces one decode step: a file is "entered" each time a call
goes into it from another file. A reader following the token reads each file once; the counts show how
often the data path goes back and forth.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

import tsqp
from tsqp.model.presets import preset_path
from tsqp.server.engine import Engine
from tsqp.tee.compose import attach, tee_model
from tsqp.tee.remote import InProcess

ROOT = str(Path(tsqp.__file__).resolve().parent) + "/"


def build(model_dir: Path, private: bool, verify: bool, tmp: Path):
    """The TEE model over an in-process engine, attached."""
    from tsqp.tee.private import PrivateOptions

    engine = Engine(str(model_dir))
    options = PrivateOptions(pads_dir=tmp) if private else None
    tee = tee_model(model_dir, InProcess(engine), verify=verify, private=options)
    attach(tee)
    return tee


def trace(step) -> tuple[Counter, list[str]]:
    entered: Counter = Counter()
    path: list[str] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        here = frame.f_code.co_filename
        caller = frame.f_back.f_code.co_filename if frame.f_back else ""
        if here.startswith(ROOT) and here != caller:
            name = here.removeprefix(ROOT)
            entered[name] += 1
            if not path or path[-1] != name:
                path.append(name)

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return entered, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--tokens", type=int, default=8, help="prompt tokens before the traced decode step")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tee = build(preset_path("tiny"), args.private, not args.no_verify, Path(tmp))
        ids = torch.arange(1, args.tokens + 2) % tee.config.vocab_size
        tee.ops.open_session(args.tokens + 1)
        tee.forward(ids[:-1])
        entered, path = trace(lambda: tee.forward(ids[-1:], pos=args.tokens))
    layers = tee.config.num_layers
    print(f"one decode token, {layers} layers, {'private' if args.private else 'plain'}, verify={not args.no_verify}")
    for name, count in sorted(entered.items(), key=lambda item: -item[1]):
        print(f"{count:6d}  {name}")
    print(f"{sum(entered.values()):6d}  entries in all, {len(entered)} files, {len(path)} file changes")


if __name__ == "__main__":
    main()
