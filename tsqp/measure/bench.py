"""`tsqp bench`: the seed's prefill benchmark (warm-up, timed prefill, statistics table), greedy decode
with the server-side KV cache (--decode N), and the same-run comparison against transformers'
monolithic forward and generate."""

from __future__ import annotations

import copy
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tsqp.stats import Stats
from tsqp.tee.generate import Generation, generate
from tsqp.tee.runner import RunOptions, open_model

WARMUP_TOKENS = 16


def token_ids(count: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed))


@dataclass
class Prefill:
    tokens: int
    seconds: float
    stats: Stats  # the timed run's counters alone


def timed_prefill(tee, stats: Stats, ids: torch.Tensor, trace: bool = False) -> Prefill:
    """One prefill of ids in a fresh session, its counters separated from everything else."""
    tee.ops.open_session(ids.shape[0])
    stats.reset()
    if trace:
        stats.start_trace()
    start = time.perf_counter()
    tee.forward(ids)
    seconds = time.perf_counter() - start
    timed = copy.deepcopy(stats)
    stats.trace = None
    tee.ops.close_session()
    return Prefill(ids.shape[0], seconds, timed)


def run_bench(
    options: RunOptions,
    tokens: int,
    compare: bool = False,
    json_path: str | None = None,
    console: Console | None = None,
    decode: int = 0,
    sweep: list[int] = (),
    trace_path: str | None = None,
) -> dict:
    """decode > 0: after the prefill, a greedy generation of `decode` tokens from the same prompt.
    sweep: more prompt lengths, each timed like the main one (and against transformers with compare)."""
    console = console or Console()
    stats = Stats()
    with open_model(options, stats) as tee:
        config = tee.config
        ids = token_ids(max([tokens, *sweep]), config.vocab_size)
        warmup = ids[: min(WARMUP_TOKENS, tokens)]
        timed_prefill(tee, stats, warmup)
        main = timed_prefill(tee, stats, ids[:tokens], trace=bool(trace_path))
        others = [timed_prefill(tee, stats, ids[:length]) for length in sweep]
        dtype = tee.ops.wire_name
        verify_setup_s = tee.ops.setup_s if options.verify else None  # computing the Freivalds keys
        pipelined = tee.ops.pipelined
        generation = generate(tee, ids[:tokens].tolist(), decode) if decode else None
    prefill_s, timed = main.seconds, main.stats
    summary = timed.summary()
    result = {
        "tokens": tokens,
        "prefill_s": prefill_s,
        "tokens_per_s": tokens / prefill_s,
        "rpc_calls": summary["rpc_calls"],
        "bytes_sent": summary["bytes_sent"],
        "bytes_received": summary["bytes_received"],
        "dtype": dtype,
        "device": options.device,
        "transport": options.transport,
        "pipelined": pipelined,
        "tee_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
        "verify": options.verify,
        "verify_s": summary["tee_ops"].get("verify", 0.0),
        "verify_setup_s": verify_setup_s,
        "detail": summary,
    }
    console.print(
        f"[bold]prefill[/bold] {tokens} tokens in {prefill_s:.3f} s ({tokens / prefill_s:.1f} tokens/s), "
        f"{config.num_layers} layers, {dtype} on {options.device}"
    )
    console.print("attention: " + ("pipelined by query chunks" if pipelined else "one chunk per layer, not pipelined"))
    if options.verify:
        console.print(
            f"verification {result['verify_s']:.3f} s ({100 * result['verify_s'] / prefill_s:.1f}% of the "
            f"prefill), keys computed at start in {verify_setup_s:.2f} s"
        )
    timed.print_table(prefill_s, console)
    if trace_path:
        timed.write_trace(trace_path)
        console.print(f"timeline written to {trace_path} (open it in ui.perfetto.dev or chrome://tracing)")
    runs = {}
    if compare:
        runs = reference_runs(options, dtype, tokens, warmup.shape[0], decode)
        sdpa, eager = runs["sdpa"]["prefill_s"], runs["eager"]["prefill_s"]
        result.update(
            reference={"sdpa_s": sdpa, "eager_s": eager}, ratio_sdpa=prefill_s / sdpa, ratio_eager=prefill_s / eager
        )
    rows = [main, *others]
    if compare or sweep:
        result["sweep"] = sweep_table(options, dtype, rows, runs if compare else None, warmup.shape[0], console)
    if generation:
        result["decode"] = decode_figures(generation, tokens, runs.get("sdpa"), console)
    console.print(f"TEE peak RSS: {result['tee_peak_rss_bytes'] / 2**20:.0f} MiB")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def reference_runs(options: RunOptions, dtype: str, tokens: int, warmup: int, decode: int = 0) -> dict:
    """transformers sdpa and eager on the same checkpoint, dtype, device and thread count."""
    from tsqp.measure.reference import time_reference

    return {
        attn: time_reference(
            options.model_dir,
            dtype,
            attn,
            tokens,
            warmup,
            seed=0,
            threads=torch.get_num_threads(),
            decode=decode if attn == "sdpa" else 0,
            device=options.device,
        )
        for attn in ("sdpa", "eager")
    }


def sweep_table(
    options: RunOptions, dtype: str, rows: list[Prefill], main_runs: dict | None, warmup: int, console: Console
) -> list[dict]:
    """Prefill time by length: the split, and transformers (when comparing), with ratios."""
    compare = main_runs is not None
    table = Table(
        title="Prefill by length" + (" against transformers (same weights, dtype, threads)" if compare else ""),
        title_justify="left",
    )
    columns = ["tokens", "split s", "GB moved"] + (
        ["sdpa s", "eager s", "split/sdpa", "split/eager"] if compare else []
    )
    for col in columns:
        table.add_column(col, justify="right")
    figures = []
    for i, row in enumerate(rows):
        moved = row.stats.bytes_sent + row.stats.bytes_received
        entry = {"tokens": row.tokens, "split_s": row.seconds, "bytes": moved}
        cells = [str(row.tokens), f"{row.seconds:.3f}", f"{moved / 1e9:.3f}"]
        if compare:
            runs = main_runs if i == 0 else reference_runs(options, dtype, row.tokens, warmup)
            sdpa, eager = runs["sdpa"]["prefill_s"], runs["eager"]["prefill_s"]
            entry.update(sdpa_s=sdpa, eager_s=eager, ratio_sdpa=row.seconds / sdpa, ratio_eager=row.seconds / eager)
            cells += [f"{sdpa:.3f}", f"{eager:.3f}", f"{row.seconds / sdpa:.2f}", f"{row.seconds / eager:.2f}"]
        table.add_row(*cells)
        figures.append(entry)
    console.print(table)
    return figures


def decode_figures(generation: Generation, prompt_tokens: int, reference: dict | None, console: Console) -> dict:
    """The decode run's figures, and transformers' generate on the same prompt (reference, with --compare)."""
    steps = max(generation.decode_tokens, 1)
    figures = {
        "new_tokens": len(generation.generated_ids),
        "ttft_s": generation.ttft_s,
        "decode_tokens_per_s": generation.decode_tokens_per_s,
        "ms_per_token": 1000 * generation.decode_s / steps,
        "rpc_calls_per_token": generation.decode_rpc_calls / steps,
        "bytes_per_token": generation.decode_bytes / steps,
    }
    table = Table(
        title=f"Decode: {figures['new_tokens']} greedy tokens after a {prompt_tokens}-token prompt",
        title_justify="left",
    )
    for col in ("run", "first token s", "tokens/s", "ms/token", "RPCs/token", "bytes/token"):
        table.add_column(col, justify="left" if col == "run" else "right")
    table.add_row(
        "split (TSQP, KV cache on the server)",
        f"{figures['ttft_s']:.3f}",
        f"{figures['decode_tokens_per_s']:.1f}",
        f"{figures['ms_per_token']:.2f}",
        f"{figures['rpc_calls_per_token']:.0f}",
        f"{figures['bytes_per_token'] / 1e3:.1f} kB",
    )
    if reference:
        ref_steps = max(reference["generated"] - 1, 1)
        ref_decode_s = reference["generate_s"] - reference["ttft_s"]
        figures["reference"] = {
            "ttft_s": reference["ttft_s"],
            "decode_tokens_per_s": ref_steps / ref_decode_s,
            "ms_per_token": 1000 * ref_decode_s / ref_steps,
        }
        figures["same_tokens"] = reference["generated_ids"] == generation.generated_ids
        figures["ratio_ms_per_token"] = figures["ms_per_token"] / figures["reference"]["ms_per_token"]
        table.add_row(
            "transformers generate (sdpa)",
            f"{reference['ttft_s']:.3f}",
            f"{figures['reference']['decode_tokens_per_s']:.1f}",
            f"{figures['reference']['ms_per_token']:.2f}",
            "-",
            "-",
        )
    console.print(table)
    if reference:
        console.print(f"greedy tokens identical to transformers: {figures['same_tokens']}")
    return figures
