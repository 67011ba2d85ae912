"""`tsqp bench`: the seed's prefill benchmark (warm-up, timed prefill, statistics table), greedy decode
with the server-side KV cache (--decode N), and the same-run comparison against transformers'
monolithic forward and generate."""

from __future__ import annotations

import copy
import json
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tsqp.errors import TsqpError
from tsqp.measure.decode import decode_figures
from tsqp.measure.floor import DecodeMark, prefill_cost, print_costs
from tsqp.measure.prompts import token_ids
from tsqp.measure.reference import time_reference
from tsqp.measure.replay import Recorder, Recording, open_replayed
from tsqp.options import RunOptions
from tsqp.stats import Stats
from tsqp.tee.compose import run_attention
from tsqp.tee.generate import Generation, generate
from tsqp.tee.runner import open_model

WARMUP_TOKENS = 16


@dataclass
class Prefill:
    tokens: int
    seconds: float
    stats: Stats  # the timed run's counters alone
    offline_s: float = 0.0  # private mode: computing the pads this prefill lacked, before it started


def timed_prefill(tee, stats: Stats, ids: torch.Tensor, trace: bool = False) -> Prefill:
    """One prefill of ids in a fresh session, its counters separated from everything else."""
    pads = getattr(tee.ops, "pads", None)
    offline_before = pads.offline_s if pads else 0.0
    tee.ops.open_session(ids.shape[0])  # private mode: missing pads are computed here, untimed
    offline_s = (pads.offline_s if pads else 0.0) - offline_before
    stats.reset()
    if trace:
        stats.start_trace()
    start = time.perf_counter()
    tee.forward(ids)
    seconds = time.perf_counter() - start
    timed = copy.deepcopy(stats)
    stats.trace = None
    tee.ops.close_session()
    return Prefill(ids.shape[0], seconds, timed, offline_s)


@dataclass
class Measured:
    """What a `tsqp bench` run measured while its model was open: the prefills, and the generation."""

    layers: int
    ids: torch.Tensor  # (max(tokens, *sweep),) the prompt; each run times a prefix of it
    warmup: torch.Tensor  # (min(WARMUP_TOKENS, tokens),) the untimed first prefill
    main: Prefill
    others: list[Prefill]  # the sweep's lengths
    dtype: str  # what travels on the wire
    verify_setup_s: float | None
    pipelined: bool
    fused: bool  # the plain split sent fused calls (server/fused_calls.py)
    generation: Generation | None
    decode_cost: dict | None  # the generation's decode steps (floor.cost)
    private: dict | None  # private mode's figures (`private_figures`)
    checks_overlapped: bool = False  # the prefill's checks ran while the server computed (checks.Overlapped)

    def costs(self) -> dict:
        """The TEE's own time in the timed prefill and in the decode steps (floor.py)."""
        prefill = prefill_cost(self.main.seconds, self.main.tokens, self.main.stats)
        return {"prefill": prefill, **({"decode": self.decode_cost} if self.decode_cost else {})}


def run_bench(
    options: RunOptions,
    tokens: int,
    compare: bool = False,
    json_path: str | None = None,
    console: Console | None = None,
    decode: int = 0,
    sweep: list[int] = (),
    trace_path: str | None = None,
    replay: bool = False,
) -> dict:
    """decode > 0: after the prefill, a greedy generation of `decode` tokens from the same prompt.
    sweep: more prompt lengths, each timed like the main one (and against transformers with compare).
    replay: then the same run twice more, untimed: once against the server, its replies recorded, and once
    over the recorded replies with no server: the floor (floor.py). The timed run records nothing: copying
    each reply into fresh memory (0.95 GB in a 512-token SmolLM2 prefill) would slow the run it measures.
    The recording's copies count in the TEE peak RSS printed then."""
    if replay and options.private:
        raise TsqpError("--replay measures the plain split: private mode's pads differ from run to run")
    console = console or Console()
    run = measure(options, tokens, decode, sweep, trace=bool(trace_path), opener=lambda s: open_model(options, s))
    result = prefill_result(options, run)
    print_prefill(options, run, result, console)
    result["tee_cost"] = costs = run.costs()
    if replay:
        recording = Recording()

        def recorder(link):
            return Recorder(link, recording)

        recorded = measure(options, tokens, decode, sweep, False, lambda s: open_model(options, s, wrap=recorder))
        floor = measure(options, tokens, decode, sweep, False, opener=lambda s: open_replayed(options, s, recording))
        result["floor"] = floor_costs = floor.costs()
        floor_costs["recorded_bytes"] = recording.nbytes
        if floor.generation:
            tokens_of = [m.generation.generated_ids for m in (run, recorded, floor)]  # the floor is the timed run's
            floor_costs["same_tokens"] = tokens_of[0] == tokens_of[1] == tokens_of[2]
        costs = {**costs, **{f"floor {k}": v for k, v in floor_costs.items() if isinstance(v, dict)}}
    print_costs(costs, console)
    if trace_path:
        run.main.stats.write_trace(trace_path)
        console.print(f"timeline written to {trace_path} (open it in ui.perfetto.dev or chrome://tracing)")
    runs = {}
    if compare and options.private:
        result.update(private_comparison(options, run, console))
    if compare:
        runs = reference_runs(options, run.dtype, tokens, run.warmup.shape[0], decode)
        result.update(reference_comparison(options, runs, run.main.seconds, console))
    if compare or sweep:
        rows = [run.main, *run.others]
        result["sweep"] = sweep_table(options, run.dtype, rows, runs if compare else None, run.warmup.shape[0], console)
    if run.generation:
        result["decode"] = decode_figures(run.generation, tokens, runs.get("sdpa"), console)
    console.print(f"TEE peak RSS: {result['tee_peak_rss_bytes'] / 2**20:.0f} MiB")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def measure(options: RunOptions, tokens: int, decode: int, sweep: list[int], trace: bool, opener) -> Measured:
    """Warm-up, the timed prefill of `tokens`, the sweep's prefills, then the generation, in one session each.
    opener(stats): the model's context (`open_model`, or `replay.open_replayed`)."""
    stats = Stats()
    with opener(stats) as tee:
        ids = token_ids(max([tokens, *sweep]), tee.config.vocab_size)
        warmup = ids[: min(WARMUP_TOKENS, tokens)]
        timed_prefill(tee, stats, warmup)
        main = timed_prefill(tee, stats, ids[:tokens], trace=trace)
        others = [timed_prefill(tee, stats, ids[:length]) for length in sweep]
        dtype = tee.ops.wire_name
        verify_setup_s = tee.ops.setup_s if options.verify else None  # computing the Freivalds keys
        pipelined, fused = tee.ops.pipelined, tee.ops.fused
        decode_offline_s = prepare_pads(tee, tokens + decode - 1) if decode and options.private else 0.0
        mark = DecodeMark(stats)
        generation = generate(tee, ids[:tokens].tolist(), decode, on_token=mark) if decode else None
        decode_cost = mark.cost(generation.decode_tokens) if decode else None
        private = private_figures(tee, main) if options.private else None
        if private:
            private["decode_offline_s"] = decode_offline_s
        layers = tee.config.num_layers
        overlapped = tee.ops.checks_overlap(tokens)
    return Measured(
        layers,
        ids,
        warmup,
        main,
        others,
        dtype,
        verify_setup_s,
        pipelined,
        fused,
        generation,
        decode_cost,
        private,
        overlapped,
    )


def prefill_result(options: RunOptions, run: Measured) -> dict:
    """The JSON figures of the timed prefill (private mode's own after them), taken once the model closed."""
    prefill_s, summary = run.main.seconds, run.main.stats.summary()
    result = {
        "tokens": run.main.tokens,
        "prefill_s": prefill_s,
        "tokens_per_s": run.main.tokens / prefill_s,
        "rpc_calls": summary["rpc_calls"],
        "bytes_sent": summary["bytes_sent"],
        "bytes_received": summary["bytes_received"],
        "dtype": run.dtype,
        "device": options.device,
        "transport": options.transport,
        "pipelined": run.pipelined,
        "fused": run.fused,  # o_proj_gate_up and down_qkv: a layer's products after attention in one call
        "attention": run_attention(options.attention, options.private),  # server, tee or decode
        "tee_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
        "verify": options.verify,
        "verify_s": summary["tee_ops"].get("verify", 0.0),  # time in checks, overlapped or not
        "verify_overlapped": run.checks_overlapped,  # made while the server computed the next call
        "verify_setup_s": run.verify_setup_s,
        "private": options.private,
        "detail": summary,
    }
    if run.private:
        result.update(run.private)
    return result


def print_prefill(options: RunOptions, run: Measured, result: dict, console: Console) -> None:
    """The prefill's line, its mode's (pads or attention), verification's cost, and the counters' table."""
    tokens, prefill_s = run.main.tokens, run.main.seconds
    mode = "private mode (masked products in float64)" if options.private else "plain mode"
    console.print(
        f"[bold]prefill[/bold] {tokens} tokens in {prefill_s:.3f} s ({tokens / prefill_s:.1f} tokens/s), "
        f"{run.layers} layers, {run.dtype} on {options.device}, {mode}"
    )
    if run.private:
        print_private(run.private, console)
    elif result["attention"] != "server":
        where = "every step" if result["attention"] == "tee" else "decode steps; the prefill's on the server"
        calls = "one fused call a layer from o_proj to the next qkv" if run.fused else "o_proj a call"
        console.print(f"attention: in the TEE over its own KV cache (qkv returns v, {calls}): {where}")
    else:
        console.print(
            "attention: " + ("pipelined by query chunks" if run.pipelined else "one chunk per layer, not pipelined")
        )
    if options.verify:
        overlapped = " in checks made while the server computed the next call" if run.checks_overlapped else ""
        console.print(
            f"verification {result['verify_s']:.3f} s{overlapped} ({100 * result['verify_s'] / prefill_s:.1f}% of "
            f"the prefill), "
            + (
                f"keys, embedding table and calibration at start in {run.verify_setup_s:.2f} s"
                if options.private
                else f"keys computed at start in {run.verify_setup_s:.2f} s"
            )
        )
    run.main.stats.print_table(prefill_s, console)


def private_comparison(options: RunOptions, run: Measured, console: Console) -> dict:
    """Private mode against the plain split on the same prompt, and (when this prefill computed pads)
    the pads' time against transformers' float64 prefill."""
    tokens, prefill_s = run.main.tokens, run.main.seconds
    plain = plain_prefill(options, run.ids[:tokens], run.warmup)
    figures = {"plain": plain, "ratio_plain": prefill_s / plain["prefill_s"]}
    console.print(
        f"plain split, same run: {plain['prefill_s']:.3f} s, {plain['bytes'] / 1e9:.2f} GB "
        f"moved: private / plain [bold]{figures['ratio_plain']:.2f}[/bold]"
    )
    offline_s = run.private["offline_s"]
    if offline_s:
        pads_reference = time_reference(
            options.model_dir, "float64", "sdpa", tokens, run.warmup.shape[0], seed=0,
            threads=torch.get_num_threads(), device=options.device,
        )  # fmt: skip
        figures["reference_float64_s"] = pads_reference["prefill_s"]
        figures["ratio_pads_float64"] = offline_s / pads_reference["prefill_s"]
        console.print(
            f"pads for {tokens} tokens: {offline_s:.3f} s against transformers' float64 prefill "
            f"{pads_reference['prefill_s']:.3f} s: [bold]{figures['ratio_pads_float64']:.2f}[/bold]"
        )
    return figures


def reference_comparison(options: RunOptions, runs: dict, prefill_s: float, console: Console) -> dict:
    """The split's prefill against transformers' (`reference_runs`), and against all of it in the TEE."""
    sdpa, eager = runs["sdpa"]["prefill_s"], runs["eager"]["prefill_s"]
    figures = {
        "reference": {"sdpa_s": sdpa, "eager_s": eager},
        "ratio_sdpa": prefill_s / sdpa,
        "ratio_eager": prefill_s / eager,
    }
    if "full_tee" in runs:
        full_tee = runs["full_tee"]["prefill_s"]
        figures["reference"]["full_tee_s"] = full_tee
        figures["speedup_over_full_tee"] = full_tee / prefill_s
        console.print(
            f"all in the TEE (transformers sdpa, float32, on {torch.get_num_threads()} CPU threads): "
            f"{full_tee:.3f} s: the split is [bold]{full_tee / prefill_s:.1f}x[/bold] faster; "
            f"transformers on {options.device}: {sdpa:.3f} s ({prefill_s / sdpa:.2f}x the split's time)"
        )
    return figures


def prepare_pads(tee, capacity: int) -> float:
    """Private mode: the pads a generation needs, computed before it starts (offline), so that its time to
    first token and decode figures are online figures. Returns the seconds it took."""
    before = tee.ops.pads.offline_s
    tee.ops.pads.reserve(capacity)
    return tee.ops.pads.offline_s - before


def private_figures(tee, main: Prefill) -> dict:
    """Private mode's own figures: the pads' cost and the leakage bound of what was masked."""
    ops = tee.ops
    return {
        "offline_s": main.offline_s,
        "offline_total_s": ops.pads.offline_s,
        "pads_computed_tokens": ops.pads.computed_tokens,
        "pads_claimed_tokens": ops.pads.claimed_tokens,
        "pad_bytes_per_token": ops.pads.bytes_per_token,
        "pad_source": "helper" if ops.options.helper is not None else "pool",
        "pad_bits": ops.options.pad_bits,
        "leak_bound_bits_per_coordinate": ops.leak_bound_bits(),
        "calibration_s": ops.calibration_s,
        "checks": ops.checked.checks if ops.checked else 0,
        "check_margin": max(ops.checked.margin.values(), default=0.0) if ops.checked else None,
    }


def print_private(figures: dict, console: Console) -> None:
    if figures["pad_source"] == "helper":
        console.print("pads: from the helper server (nothing precomputed, no offline time)")
    else:
        console.print(
            f"pads: {figures['offline_s']:.3f} s offline for this prefill (computed in the TEE; "
            f"{figures['pads_claimed_tokens']} tokens' pads taken from pools made ahead), "
            f"{figures['pad_bytes_per_token'] / 1e6:.2f} MB a token"
        )
    console.print(
        f"leakage bound: at most {figures['leak_bound_bits_per_coordinate']:.2e} bits per masked coordinate "
        f"(Gaussian pads 2^{figures['pad_bits']} times the calibrated inputs); "
        f"calibration {figures['calibration_s']:.2f} s"
    )


def plain_prefill(options: RunOptions, ids: torch.Tensor, warmup: torch.Tensor) -> dict:
    """The plain split on the same prompt, in the same run, on a server of its own (a private client's
    server may be --private-only)."""
    stats = Stats()
    with open_model(replace(options, private=False, helper=None, connect=None), stats) as tee:  # its own server
        timed_prefill(tee, stats, warmup)
        run = timed_prefill(tee, stats, ids)
    return {"prefill_s": run.seconds, "bytes": run.stats.bytes_sent + run.stats.bytes_received}


def reference_plan(device: str, dtype: str) -> dict[str, tuple[str, str, str]]:
    """The transformers runs `--compare` makes: name -> (attention, device, dtype).

    sdpa and eager run where the server runs, in its dtype. With the server on a GPU (or in a dtype
    other than the TEE's float32), `full_tee` also runs transformers on the TEE's CPU cores in float32:
    what a user would run with no GPU at all. On a CPU server in float32, sdpa is that run already."""
    plan = {attn: (attn, device, dtype) for attn in ("sdpa", "eager")}
    if not device.startswith("cpu") or dtype != "float32":
        plan["full_tee"] = ("sdpa", "cpu", "float32")
    return plan


def reference_runs(options: RunOptions, dtype: str, tokens: int, warmup: int, decode: int = 0) -> dict:
    """transformers on the same checkpoint and thread count (`reference_plan`): the TEE's threads, so a
    full-TEE run uses the cores the TEE has."""
    return {
        name: time_reference(
            options.model_dir,
            run_dtype,
            attn,
            tokens,
            warmup,
            seed=0,
            threads=torch.get_num_threads(),
            decode=decode if name == "sdpa" else 0,
            device=run_device,
        )
        for name, (attn, run_device, run_dtype) in reference_plan(options.device, dtype).items()
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
