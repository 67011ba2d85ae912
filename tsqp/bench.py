"""`tsqp bench`: the seed's prefill benchmark (warm-up, timed prefill, statistics table), and the
same-run comparison against transformers' monolithic forward."""

from __future__ import annotations

import copy
import json
import resource
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tsqp.runner import RunOptions, open_model
from tsqp.stats import Stats

WARMUP_TOKENS = 16


def token_ids(count: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed))


def run_bench(options: RunOptions, tokens: int, compare: bool = False, json_path: str | None = None,
              console: Console | None = None) -> dict:
    console = console or Console()
    stats = Stats()
    with open_model(options, stats) as tee:
        config = tee.config
        ids = token_ids(tokens, config.vocab_size)
        warmup = ids[: min(WARMUP_TOKENS, tokens)]
        tee.ops.open_session(warmup.shape[0])
        tee.forward(warmup)
        tee.ops.close_session()
        tee.ops.open_session(tokens)
        stats.reset()
        start = time.perf_counter()
        tee.forward(ids)
        prefill_s = time.perf_counter() - start
        timed = copy.deepcopy(stats)
        tee.ops.close_session()
        dtype = tee.ops.wire_name
    summary = timed.summary()
    result = {
        "tokens": tokens, "prefill_s": prefill_s, "tokens_per_s": tokens / prefill_s,
        "rpc_calls": summary["rpc_calls"], "bytes_sent": summary["bytes_sent"],
        "bytes_received": summary["bytes_received"], "dtype": dtype, "device": options.device,
        "tee_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(), "detail": summary,
    }
    console.print(f"[bold]prefill[/bold] {tokens} tokens in {prefill_s:.3f} s ({tokens / prefill_s:.1f} tokens/s), "
                  f"{config.num_layers} layers, {dtype} on {options.device}")
    timed.print_table(prefill_s, console)
    if compare:
        from tsqp.reference import time_prefill

        sdpa = time_prefill(options.model_dir, ids, dtype, "sdpa", warmup)
        eager = time_prefill(options.model_dir, ids, dtype, "eager", warmup)
        result.update(reference={"sdpa_s": sdpa, "eager_s": eager}, ratio_sdpa=prefill_s / sdpa, ratio_eager=prefill_s / eager)
        table = Table(title="Split against transformers (same weights, dtype, threads)", title_justify="left")
        for col in ("run", "prefill s", "split / run"):
            table.add_column(col, justify="left" if col == "run" else "right")
        table.add_row("split (TSQP)", f"{prefill_s:.3f}", "1.00")
        table.add_row("transformers sdpa", f"{sdpa:.3f}", f"{prefill_s / sdpa:.2f}")
        table.add_row("transformers eager", f"{eager:.3f}", f"{prefill_s / eager:.2f}")
        console.print(table)
    console.print(f"TEE peak RSS: {result['tee_peak_rss_bytes'] / 2**20:.0f} MiB")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
