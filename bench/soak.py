"""Load with faults: N TEE clients generating at once on one server, some SIGKILLed, the server restarted.

    python bench/soak.py [--model tiny] [--clients 8] [--generations 30] [--kills 2] [--no-restart] [--json FILE]

Each client process runs `--generations` greedy generations of random prompt and answer lengths
(seeded by its index) and prints each finished one as a JSON line; a generation cut off by the server's
restart is run again once the client has reconnected. Meanwhile `--kills` clients are killed with
SIGKILL mid-generation and the server is stopped and started again once. Then:

- every finished generation, killed clients' included, equals the same generation run alone (in one
  process, on an engine of its own);
- once the server's idle timeout has passed, it holds no session and no cache bytes (its baseline);
- after one more client has started (a client sweeps the arena files of dead ones), no arena file of
  this run's clients is left in /dev/shm;
- the server never crashed: it is still running, and it is the one process the run restarted.

Exit status 0 when every check holds; the figures go to --json. tests/system/test_soak.py runs a short one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

IDLE_TIMEOUT_S = 3.0


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a folder, GGUF file or preset (default: the tiny preset)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--generations", type=int, default=30, help="per client")
    parser.add_argument("--kills", type=int, default=2, help="clients killed with SIGKILL mid-generation")
    parser.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True, help="restart the server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt", type=int, default=48)
    parser.add_argument("--max-new", type=int, default=24)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # a client process of the run
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    return parser.parse_args()


def plan(index: int, args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    """A client's generations: (prompt ids, new tokens), the same in the worker and in the check."""
    rng = random.Random(args.seed * 1000 + index)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(1, args.max_prompt))], rng.randint(1, args.max_new))
        for _ in range(args.generations)
    ]


def worker(args: argparse.Namespace) -> None:
    """One TEE client: its generations in order, reconnecting after the server went away."""
    from contextlib import ExitStack

    from tsqp.errors import TsqpError
    from tsqp.model.config import ModelConfig
    from tsqp.model.sources import resolve_model
    from tsqp.options import RunOptions
    from tsqp.tee.generate import generate
    from tsqp.tee.runner import open_model

    folder = resolve_model(args.model)
    options = RunOptions(model_dir=folder, connect=args.endpoint, timeout_s=30, connect_timeout_s=5)
    jobs = plan(args.worker, args, ModelConfig.from_model_dir(folder).vocab_size)
    stack, tee = ExitStack(), None
    for n, (prompt, new) in enumerate(jobs):
        for attempt in range(60):
            try:
                if tee is None:
                    tee = stack.enter_context(open_model(options))
                ids = generate(tee, prompt, new).generated_ids
                break
            except TsqpError as exc:  # the server restarting: reconnect and run the generation again
                print(f"worker {args.worker}: generation {n}, attempt {attempt}: {exc}", file=sys.stderr, flush=True)
                stack.close()
                stack, tee = ExitStack(), None
                time.sleep(0.5)
        else:
            raise SystemExit(f"worker {args.worker}: generation {n} never ran")
        print(json.dumps({"worker": args.worker, "n": n, "ids": ids}), flush=True)
    stack.close()


def start_server(folder: Path, endpoint: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tsqp", "serve", "--model", str(folder), "--listen", endpoint]
    server = subprocess.Popen([*command, "--idle-timeout", str(IDLE_TIMEOUT_S)], stderr=subprocess.DEVNULL)
    ping(endpoint, wait_s=120)
    return server


def ping(endpoint: str, wait_s: float = 10.0) -> dict:
    from tsqp.errors import ConnectionLost
    from tsqp.wire.client import Client

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with Client(endpoint, timeout_s=5, connect_timeout_s=2, shm=False) as client:
                return client.call("ping").args
        except ConnectionLost:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def shm_files(pids: set[int]) -> set[str]:
    """Arena files of these processes (the default arena name holds its client's pid)."""
    shm = Path("/dev/shm")
    names = {p.name for p in shm.glob("tsqp-arena-*")} if shm.is_dir() else set()
    return {name for name in names if name.split("-")[2].isdigit() and int(name.split("-")[2]) in pids}


def main() -> int:
    args = arguments()
    if args.worker is not None:
        worker(args)
        return 0
    from tsqp.model.config import ModelConfig
    from tsqp.model.sources import resolve_model

    started = time.perf_counter()
    folder = resolve_model(args.model)
    vocab = ModelConfig.from_model_dir(folder).vocab_size
    workdir = Path(tempfile.mkdtemp(prefix="tsqp-soak-"))
    endpoint = f"ipc://{workdir}/server.sock"
    server = start_server(folder, endpoint)
    baseline = ping(endpoint)
    rng = random.Random(args.seed)
    base = [sys.executable, __file__, "--model", str(folder), "--endpoint", endpoint, "--seed", str(args.seed)]
    base += ["--generations", str(args.generations), "--max-prompt", str(args.max_prompt)]
    base += ["--max-new", str(args.max_new)]
    workers = [
        subprocess.Popen([*base, "--worker", str(i)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for i in range(args.clients)
    ]
    outputs: dict[int, list[str]] = {i: [] for i in range(args.clients)}

    def read(i: int) -> None:
        for line in workers[i].stdout:
            outputs[i].append(line)

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(args.clients)]
    for reader in readers:
        reader.start()
    doomed = set(rng.sample(range(args.clients), min(args.kills, args.clients)))
    killed, restarts, restarted_at = [], 0, None
    while any(w.poll() is None for w in workers):
        time.sleep(0.05)
        for i in sorted(doomed - set(killed)):
            if len(outputs[i]) >= 1 + rng.randrange(max(args.generations // 2, 1)) and workers[i].poll() is None:
                time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside its next generation
                workers[i].send_signal(signal.SIGKILL)
                killed.append(i)
        progress = sum(len(o) for o in outputs.values()) / max(args.clients * args.generations, 1)
        if args.restart and restarts == 0 and progress >= 0.4:
            if server.poll() is not None:
                break  # it crashed: reported below
            server.terminate()
            server.wait(timeout=30)
            server = start_server(folder, endpoint)
            restarts, restarted_at = 1, progress
    for reader in readers:
        reader.join(timeout=10)
    crashed = server.poll() is not None
    failed_workers = [i for i, w in enumerate(workers) if w.returncode not in (0, -signal.SIGKILL)]

    from tsqp.server.engine import Engine
    from tsqp.tee.compose import tee_model
    from tsqp.tee.generate import generate
    from tsqp.tee.remote import InProcess

    alone = tee_model(folder, InProcess(Engine(str(folder))))
    alone.attach()
    checked, mismatches = 0, []
    for i, lines in outputs.items():
        jobs = plan(i, args, vocab)
        for line in lines:
            result = json.loads(line)
            prompt, new = jobs[result["n"]]
            if generate(alone, prompt, new).generated_ids != result["ids"]:
                mismatches.append((i, result["n"]))
            checked += 1
    after = {}
    if not crashed:
        from tsqp.options import RunOptions
        from tsqp.tee.runner import open_model

        with open_model(RunOptions(model_dir=folder, connect=endpoint)) as tee:  # a new client sweeps dead arenas
            tee.ops.open_session(1)
            tee.ops.close_session()
        time.sleep(IDLE_TIMEOUT_S + 1.5)  # killed clients' sessions expire
        after = ping(endpoint)
        server.terminate()
        server.wait(timeout=30)
    left = sorted(shm_files({w.pid for w in workers} | {os.getpid()}))  # other processes' arenas are theirs
    figures = {
        "clients": args.clients,
        "generations_per_client": args.generations,
        "generations_checked": checked,
        "mismatches": mismatches,
        "killed": sorted(killed),
        "restarts": restarts,
        "restarted_at_progress": restarted_at,
        "server_crashed": crashed,
        "failed_workers": failed_workers,
        "baseline": baseline,
        "after": after,
        "shm_left": left,
        "batched_requests_after_restart": after.get("batched"),
        "seconds": time.perf_counter() - started,
    }
    ok = (
        not mismatches
        and not crashed
        and not failed_workers
        and not left
        and after.get("sessions") == baseline["sessions"]
        and after.get("cache_bytes") == baseline["cache_bytes"]
        and checked >= (args.clients - len(killed)) * args.generations
    )
    figures["ok"] = ok
    print(json.dumps(figures, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=2))
    for w in workers:
        if w.poll() is None:
            w.kill()
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
