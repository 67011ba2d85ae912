"""`tsqp bench --decode`: the generation's figures, against transformers' generate on the same prompt."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tsqp.tee.generate import Generation


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
        "split (TSQP)",
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
