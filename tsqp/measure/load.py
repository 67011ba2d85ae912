"""`tsqp bench --clients N`: N TEE client processes decoding at once against one server.

Each client is its own process (as a deployment's would be: its own TEE, its own link, its own
session), attaches, and waits at a barrier; then all prefill the same-length prompt (different ids)
and decode `decode` greedy tokens, stamping every token on the system-wide monotonic clock. The run
with one client comes first, on the same server, so the ratio is measured in one run.

aggregate decode tokens/s = every client's decode tokens / (last token of any client - first token of
any client); per-token latency = the gaps between a client's consecutive tokens, over all clients.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from tsqp.options import RunOptions
from tsqp.tee.runner import open_model, start_server

START_TIMEOUT_S = 600.0


def client_main(options: RunOptions, index: int, threads: int, tokens: int, decode: int, barrier, results) -> None:
    """One client process: attach, wait for the others, prefill and decode, report token times."""
    import torch

    from tsqp.measure.prompts import token_ids
    from tsqp.tee.generate import generate

    torch.set_num_threads(threads)
    try:
        with open_model(options) as tee:
            ids = token_ids(tokens, tee.config.vocab_size, seed=1000 + index).tolist()
            generate(tee, ids[: min(8, tokens)], 2)  # warm-up
            stamps: list[float] = []
            cpu: list[float] = []  # this process's CPU seconds at each token
            server_cpu: list[float] = []  # the server's, when the first token came and after the last

            def on_token(token: int) -> None:
                stamps.append(time.perf_counter())
                cpu.append(time.process_time())
                if len(stamps) == 1:
                    server_cpu.append(tee.ops.link.call("ping").args.get("cpu_s", 0.0))

            barrier.wait(timeout=START_TIMEOUT_S)
            # the server's count of batched requests once every client is past its warm-up (which may batch too)
            batched_before = tee.ops.link.call("ping").args.get("batched", 0)
            calls, start = tee.stats.rpc_calls, time.perf_counter()
            result = generate(tee, ids, decode + 1, on_token=on_token)
            calls = tee.stats.rpc_calls - calls - 1  # less the ping at the first token
            pong = tee.ops.link.call("ping").args
            batched = pong.get("batched", 0)  # the server's count, all clients so far
            server_cpu.append(pong.get("cpu_s", 0.0))
        results.put(
            {
                "index": index,
                "start": start,
                "stamps": stamps,
                "ids": result.generated_ids,
                "calls": calls,
                "cpu": cpu,
                "server_cpu": server_cpu,
                "server_batched_before": batched_before,
                "server_batched": batched,
            }
        )
    except BaseException as exc:  # reported by the parent, which must not wait at the barrier forever
        barrier.abort()
        results.put({"index": index, "error": f"{type(exc).__name__}: {exc}"})


def run_clients(options: RunOptions, clients: int, tokens: int, decode: int) -> list[dict]:
    """Every client's report, in index order; the first error stops the run."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each, no forked torch state
    barrier = context.Barrier(clients)
    results = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // clients)  # the clients share the machine's cores
    processes = [
        context.Process(target=client_main, args=(options, i, threads, tokens, decode, barrier, results), daemon=True)
        for i in range(clients)
    ]
    for process in processes:
        process.start()
    reports = []
    try:
        for _ in processes:
            report = results.get(timeout=START_TIMEOUT_S + 60 * max(decode, 1))
            if "error" in report:
                from tsqp.errors import TsqpError

                raise TsqpError(f"bench client {report['index']} failed: {report['error']}")
            reports.append(report)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return sorted(reports, key=lambda r: r["index"])


def figures(reports: list[dict]) -> dict:
    """Decode throughput and per-token latency of one run (the first token, the prefill's, left out)."""
    gaps = [b - a for r in reports for a, b in zip(r["stamps"][:-1], r["stamps"][1:], strict=True)]
    decode_tokens = sum(len(r["stamps"]) - 1 for r in reports)
    window = max(r["stamps"][-1] for r in reports) - min(r["stamps"][0] for r in reports)
    per_client = [(len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in reports]
    ordered = sorted(gaps)
    return {
        "clients": len(reports),
        "decode_tokens": decode_tokens,
        "aggregate_decode_tokens_per_s": decode_tokens / window if window > 0 else 0.0,
        "per_client_decode_tokens_per_s": per_client,
        "p50_token_ms": 1000 * statistics.median(ordered),
        "p99_token_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "ttft_s": [r["stamps"][0] - r["start"] for r in reports],
        "requests": sum(r["calls"] for r in reports),
        # CPU per decode token: each client's own, and the server's over the window (all its threads)
        "client_cpu_ms_per_token": statistics.mean(
            1000 * (r["cpu"][-1] - r["cpu"][0]) / (len(r["cpu"]) - 1) for r in reports
        ),
        "server_cpu_ms_per_token": 1000
        * (max(r["server_cpu"][-1] for r in reports) - min(r["server_cpu"][0] for r in reports))
        / decode_tokens,
    }


def run_load(options: RunOptions, clients: int, tokens: int, decode: int, console: Console | None = None) -> dict:
    """One client alone, then `clients` at once, then one client alone again, on one server; the figures of
    all three, and the ratio of the aggregate to the mean of the two lone runs (this host's speed drifts
    by tens of percent in a minute: a lone run on both sides cancels a steady drift)."""
    console = console or Console()
    if decode < 2:
        from tsqp.errors import TsqpError

        raise TsqpError("--clients needs --decode of at least 2 tokens")
    with ExitStack() as stack:
        if not options.connect:
            server = stack.enter_context(start_server(options))
            options = replace(options, connect=server.endpoint)
        alone_reports = run_clients(options, 1, tokens, decode)
        alone = figures(alone_reports)
        together_reports = run_clients(options, clients, tokens, decode)
        together = figures(together_reports)
        after = figures(run_clients(options, 1, tokens, decode))
    single = (alone["aggregate_decode_tokens_per_s"] + after["aggregate_decode_tokens_per_s"]) / 2
    # requests that ran in a product shared with another client's, of all the run's requests (the server's
    # count after the run, less its count before any client began: the warm-ups, which may batch, are not in it)
    shared = max(r["server_batched"] for r in together_reports) - min(
        r["server_batched_before"] for r in together_reports
    )
    result = {
        "clients": clients,
        "tokens": tokens,
        "decode": decode,
        "aggregate_decode_tokens_per_s": together["aggregate_decode_tokens_per_s"],
        "single_client_decode_tokens_per_s": single,
        "p50_token_ms": together["p50_token_ms"],
        "p99_token_ms": together["p99_token_ms"],
        "ratio_aggregate_to_single": together["aggregate_decode_tokens_per_s"] / single,
        "batched_share": shared / max(together["requests"], 1),
        "single": alone,
        "together": together,
        "single_after": after,
        "generated_ids": [r["ids"] for r in together_reports],
    }
    table = Table(title=f"Decode with {clients} clients on one server ({tokens}-token prompts, {decode} tokens each)")
    columns = ("run", "aggregate tokens/s", "per-client tokens/s", "p50 ms/token", "p99 ms/token")
    for col in (*columns, "CPU ms/token: client", "server"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, run in (("1 client", alone), (f"{clients} clients", together), ("1 client again", after)):
        per = run["per_client_decode_tokens_per_s"]
        table.add_row(
            name,
            f"{run['aggregate_decode_tokens_per_s']:.1f}",
            f"{min(per):.1f}-{max(per):.1f}" if len(per) > 1 else f"{per[0]:.1f}",
            f"{run['p50_token_ms']:.1f}",
            f"{run['p99_token_ms']:.1f}",
            f"{run['client_cpu_ms_per_token']:.1f}",
            f"{run['server_cpu_ms_per_token']:.1f}",
        )
    console.print(table)
    console.print(
        f"aggregate decode with {clients} clients / one client (the mean of its two runs): "
        f"[bold]{result['ratio_aggregate_to_single']:.2f}x[/bold]"
        f"; {100 * result['batched_share']:.0f}% of the {clients} clients' requests ran in a shared product"
    )
    return result
