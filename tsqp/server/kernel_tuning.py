"""Which linear kernel is fastest on this host, for each weight shape and row count, measured once when a CPU
server loads (kernels.set_plan), as cuDNN's benchmark mode or a BLAS autotuner would.

The fastest kernel depends on the processor more than on anything the code can know: the packed copy, the
plain weight and the weight on the left of an MKL product each win on some host and lose on another
(docs/benchmarks.md has the figures by host). A table written for one host is wrong on the next, so the
server measures.

For every float32 weight shape on the CPU of at least TUNE_MIN_WEIGHTS elements (oneDNN's larger cost a
call, which set kernels.ONEDNN_MIN_WEIGHTS, is measured with the rest), and each row count of
kernels.PLAN_ROWS, the candidates are timed in turn: oneDNN on the plain weight, oneDNN on a packed copy,
MKL with the weight on the left (2 to LEFT_MAX_ROWS rows), MKL's x W^T. Each of REPS rounds runs over
as many weights of the shape as hold SAMPLE_BYTES (different layers: one weight that fits the cache
would be timed from it), or over the first rows of a larger weight; the fastest round counts. Where
packed ranks first for some row count, every weight of the shape gets its packed copy at once (where
the memory allows: kernels.memory_allows), not in the first product that needs it; otherwise the copies
made to time it are freed. What was measured is returned for the server's ping and its log.

A server measures each shape once per host: the figures are kept (kernel_plans.PlanStore) and later starts
plan from them, so that a restart does not change which kernel, and which order of sums, a product takes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch

from tsqp.server import kernels
from tsqp.server.kernel_plans import PlanStore

TUNE_MIN_WEIGHTS = 1 << 16  # elements: smaller weights (a test model's) keep the static rules of kernels.py
REPS = 4  # timed rounds per candidate and row count (after one warm-up); the fastest round counts
SAMPLE_WEIGHTS = 3  # weights of a shape timed in each round, at most
SAMPLE_BYTES = 48 << 20  # ... as many as hold this much (more than a last-level cache); a larger weight's first rows
LEFT_MAX_ROWS = 8  # the weight on the left is a few-row kernel (it lost from 12 rows on): not timed beyond

Clock = Callable[[], float]


def tunable(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.numel() >= TUNE_MIN_WEIGHTS
    )


def tune(
    weights: Iterable[torch.Tensor], clock: Clock = time.perf_counter, store: PlanStore | None = None
) -> dict[str, dict[int, dict[str, float]]]:
    """Sets the plan of every tunable weight shape not planned yet, from the store's kept figures where it has
    them, else measured (and then kept there); returns the figures, ms a GB of weights by shape ("11264x2048"),
    row count and kernel. Nothing happens where oneDNN is not usable or TSQP_CPU_LINEAR names a fixed kernel."""
    if kernels.choice() not in ("auto", "unpacked") or not kernels.onednn_usable():
        return {}
    groups: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for weight in weights:
        if tunable(weight) and kernels.plan_for(weight) is None:
            groups[tuple(weight.shape)].append(weight)
    if not groups:
        return {}
    with store.locked() if store is not None else nullcontext():
        kept = store.load() if store is not None else {}
        figures = {describe_shape(shape): kept.get(describe_shape(shape)) for shape in groups}
        with torch.inference_mode():
            for shape, group in groups.items():
                name = describe_shape(shape)
                if figures[name] is None or set(figures[name]) != set(kernels.PLAN_ROWS):
                    figures[name] = measure(samples(group), clock)
                apply(group, figures[name])
        if store is not None and any(name not in kept for name in figures):
            store.save(figures)
    return figures


def apply(group: list[torch.Tensor], figures: dict[int, dict[str, float]]) -> None:
    """Sets the plan of the group's shape; where packed ranks first for some row count, every weight of the
    shape gets its packed copy now, not in a first request's product (where memory allows); otherwise the
    copies made to time it are freed."""
    rankings = {rows: ranking(times) for rows, times in figures.items()}
    kernels.set_plan(group[0], rankings)
    packed = any(names[0] == "packed" for names in rankings.values())
    for weight in group:
        if packed:
            kernels.packed_copy(weight)
        else:
            kernels.drop_packed(weight)


def samples(group: list[torch.Tensor]) -> list[torch.Tensor]:
    """What each round times: as many weights of the group as hold SAMPLE_BYTES (too many for a cache), or the
    first rows of one that holds more (the LM head's 262 MB would take seconds; a product's time a GB
    hardly depends on the output rows)."""
    row_bytes = group[0].shape[1] * group[0].element_size()
    nbytes = group[0].shape[0] * row_bytes
    if nbytes > SAMPLE_BYTES:
        return [group[0][: SAMPLE_BYTES // row_bytes]]
    return group[: max(1, min(SAMPLE_WEIGHTS, -(-SAMPLE_BYTES // nbytes)))]


def ranking(times: dict[str, float]) -> tuple[str, ...]:
    return tuple(sorted(times, key=times.__getitem__))


def measure(sample: list[torch.Tensor], clock: Clock) -> dict[int, dict[str, float]]:
    """ms a GB of weights, by row count and kernel, each the fastest of REPS rounds over the sample (a shared
    host only ever adds time: the least is the kernel's own)."""
    packable = kernels.choice() == "auto" and all(kernels.packed_copy(w) is not None for w in sample)
    gigabytes = sum(w.numel() * w.element_size() for w in sample) / 1e9
    generator = torch.Generator().manual_seed(0)
    figures = {}
    for rows in kernels.PLAN_ROWS:
        x = torch.randn(rows, sample[0].shape[1], generator=generator)
        names = [
            name
            for name in kernels.KERNELS
            if (name != "packed" or packable) and (name != "left" or 2 <= rows <= LEFT_MAX_ROWS)
        ]
        for name in names:  # warm-up: first-call set-up, pages touched
            kernels.run(name, x, sample[0])
        rounds: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(REPS):
            for name in names:  # in turn: a drift of the host's speed falls on every candidate alike
                start = clock()
                for weight in sample:
                    kernels.run(name, x, weight)
                rounds[name].append(clock() - start)
        figures[rows] = {name: 1000 * min(t) / gigabytes for name, t in rounds.items()}
    return figures


def describe_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def describe(measured: dict[str, dict[int, dict[str, float]]]) -> str:
    """One line per shape: the fastest kernel by row count, runs of equal choices merged ("packed 1-64 rows")."""
    lines = []
    for shape, figures in measured.items():
        runs: list[tuple[str, int, int]] = []
        for rows in kernels.PLAN_ROWS:
            best = ranking(figures[rows])[0]
            if runs and runs[-1][0] == best:
                runs[-1] = (best, runs[-1][1], rows)
            else:
                runs.append((best, rows, rows))
        choices = ", ".join(f"{name} {lo}-{hi}" if lo != hi else f"{name} {lo}" for name, lo, hi in runs)
        lines.append(f"{shape}: {choices} rows")
    return "; ".join(lines)
