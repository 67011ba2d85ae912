"""The TEE side natively and under gramine-direct, in one run: time to first token, decode tokens/s, the
TEE's peak RSS and the whole run's wall time, against one `tsqp serve` on the host over tcp + shm.

    . /opt/gramine/env.sh
    python bench/gramine_direct.py --model smollm2-135m-instruct [--private]

Peak RSS is GNU time's %M of the TEE process (under gramine-direct: of the LibOS process, which holds
the interpreter, torch and the model's TEE-side tensors). Prints one markdown row per run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRAMINE_DIR = Path(__file__).resolve().parents[1] / "gramine"
PROMPT = "What is the capital of France?"
FIGURES = re.compile(r"first token ([\d.]+) s, decode ([\d.]+) tokens/s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(command: list[str], env: dict) -> tuple[str, float, float]:
    """(output, wall seconds, peak RSS in MiB) of `command` under GNU time."""
    start = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-f", "peak-kb %M", *command], env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{out[-3000:]}")
    return out, wall, int(re.search(r"peak-kb (\d+)", out).group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()
    from tsqp.model.sources import resolve_model

    model = Path(resolve_model(args.model))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "TSQP_QUIET_SERVER": "1"}
    server = subprocess.Popen([sys.executable, "-m", "tsqp", "serve", "--model", model, "--listen", endpoint], env=env)
    work = Path(tempfile.mkdtemp(prefix="tsqp-gramine-bench-"))
    pads = Path(tempfile.mkdtemp(prefix="tsqp-gramine-pads-", dir="/var/tmp"))
    try:
        time.sleep(5)
        flags = ["generate", "--chat", "--prompt", PROMPT, "--max-new-tokens", "24"]
        private = ["--private", "--pads-dir", str(pads / "native")] if args.private else []
        native = [sys.executable, "-m", "tsqp", *flags, "--model", str(model), "--connect", endpoint, *private]
        build = work / "build"
        build.mkdir()
        (pads / "enclave").mkdir()
        for source in (GRAMINE_DIR / "Makefile", *GRAMINE_DIR.glob("*.template"), *GRAMINE_DIR.glob("*.py")):
            shutil.copy(source, build)
        make = ["make", "-s", "-C", str(build), f"PYTHON={sys.executable}", f"MODEL={model}", f"SERVER={endpoint}"]
        make += [f"TEE_ARGS={','.join(flags)}"]
        make += ["PRIVATE=1", f"PADS_DIR={pads / 'enclave'}"] if args.private else []
        subprocess.run([*make, "tsqp-tee.manifest"], env=env, check=True, capture_output=True)
        print("| run | first token s | decode tokens/s | TEE peak RSS MiB | wall s |")
        print("|---|---|---|---|---|")
        for name, command in (("native", native), ("gramine-direct", [*make, "direct"])):
            out, wall, peak = timed(command, env)
            first, decode = FIGURES.search(out).groups()
            print(f"| {name} | {first} | {decode} | {peak:.0f} | {wall:.1f} |", flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(pads, ignore_errors=True)


if __name__ == "__main__":
    main()
