"""The server's linear products, x W^T + b: oneDNN on a CPU in float32, torch.matmul (MKL, cuBLAS) elsewhere.

On a CPU, torch.matmul hands float32 products to MKL. On AMD processors MKL runs a generic code path,
and its few-row products are slow there: on this project's 2-core EPYC (Zen 3) host a 4-row product
cost 296 to 366 ms a GB of weights against 81 for one row, so 4 rows took 3.6 to 4.5 times as long as 1
and batching several clients' rows into one product gained nothing. oneDNN (PyTorch's mkldnn, built
into its x86-64 and arm64 wheels) dispatches on the instruction set, not the vendor: 60 ms a GB for
one row, 77 to 107 for 4 rows, 100 to 118 for 8 (docs/benchmarks.md, "Linear kernels"). The products
are the same sums in another order: results differ from MKL's in the last bits (relative 1e-6 at the
1.1B shape), far inside the Freivalds tolerance.

oneDNN costs 30 to 50 us more per call than MKL, whatever the size (a 64 x 64 weight: 35 against 3 us),
so weights under ONEDNN_MIN_WEIGHTS elements keep torch.matmul: one row through a 192 x 576 weight took
54 us by oneDNN and 25 by MKL, 576 x 1536 149 and 116, 256 x 2048 87 and 73; from 1.8 M elements up
oneDNN wins (3072 x 576: 166 against 284 us, 2048 x 2048: 413 against 1190). For TinyLlama-1.1B that
leaves v_proj to MKL; for SmolLM2-135M all but gate_up and the LM head.

A few rows (2 to WEIGHT_LEFT_ROWS: several clients' decode rows batched, Engine.handle_batch) go through MKL the
other way round, (W x^T)^T: with the weight on the left MKL streams it once for all the rows, where
both x W^T and oneDNN slow down with every row. gate_up of the 1.1B shape, float32, 2 threads, ms a GB
of weights (docs/benchmarks.md, "Weight on the left"): oneDNN 53 / 103 / 118 / 141 for 1 / 2 / 4 / 8
rows, (W x^T)^T 67 / 82 / 78 / 113, x W^T 68 / 130 / 358 / 435; from 12 rows on oneDNN is ahead again
(168 against 255). Private mode's float64 products gain the same (x W^T 84 / 122 / 152 for 2 / 4 / 8
rows, (W x^T)^T 62 / 69 / 112); bfloat16 and float16 keep torch.matmul as it is.

The large weights (PACKED_MIN_WEIGHTS elements and up: gate_up, down and the LM head of the 1.1B shape)
get a second copy in oneDNN's blocked layout the first time a product of 2 rows or more needs one
(`torch.ops.mkldnn._reorder_linear_weight`, 36 ms for gate_up), when the host has the memory for it
(MemAvailable keeps PACK_RESERVE_FRACTION of the total free after the copy): oneDNN then reads the
weight in the order its kernel consumes it. gate_up, ms a GB, 2 / 4 / 8 / 16 / 128 rows: 58 / 66 / 93 /
147 / 889 packed against 84 / 86 / 129 with the weight on the left and 203 / 930 unpacked (16, 128);
down 62 / 71 / 92 against 67 / 63 / 110, the LM head 53 / 65 / 94 against 67 / 72 / 112. One row keeps
the plain weight (49 against 66 packed): a lone client's decode pays nothing, and a server that never
batches never makes the copy. For TinyLlama-1.1B the copies take 3.3 GB. The packed product sums in
another order again: the last bits differ, as with any kernel choice here.

Those are static rules, measured on one host. A CPU server measures instead, at load, which of the four
kernels (`onednn`, `packed`, `left`, `mkl`) is fastest for each of its weight shapes and row counts
(kernel_tuning.py) and sets that plan here (`set_plan`): a product takes its plan's first usable kernel
(`packed` is passed over where its copy could not be made). The static rules remain for weights no plan
covers (under kernel_tuning.TUNE_MIN_WEIGHTS elements: a test model's) and for float64.

`TSQP_CPU_LINEAR` picks the kernels, to compare or where one misbehaves: `auto` (the default, as above),
`unpacked` (as auto, without the packed copies), `onednn` (oneDNN for every float32 product, no weight
on the left, no packed copies, no plan), `mkl` (torch.matmul x W^T everywhere). oneDNN is used only for float32
on the CPU, and only after a self-test on first use gives the same product as torch.matmul.
"""

from __future__ import annotations

import os
import weakref

import torch

_ONEDNN: bool | None = None  # decided on first use
ONEDNN_MIN_WEIGHTS = 1 << 20  # elements of a weight below which MKL's smaller per-call cost wins
WEIGHT_LEFT_ROWS = 8  # products of 2 to this many rows on a CPU: (W x^T)^T
WEIGHT_LEFT_DTYPES = (torch.float32, torch.float64)  # measured to gain; the others keep torch.matmul
PACKED_MIN_WEIGHTS = 8 << 20  # elements of a weight from which products of 2 rows and more use a packed copy
PACKED_FOR_ROWS = 8  # the batch size oneDNN lays the packed copy out for (it serves any row count)
PACK_RESERVE_FRACTION = 0.1  # of the host's memory left available after a packed copy is made
_PACKED: dict[int, torch.Tensor | None] = {}  # id(weight) -> its packed copy, or None: not made (no memory)


def choice() -> str:
    """`TSQP_CPU_LINEAR`: auto, onednn or mkl (read on every product: tests and benchmarks switch it)."""
    return os.environ.get("TSQP_CPU_LINEAR", "auto")


def onednn_usable() -> bool:
    """Whether float32 CPU products go through oneDNN (decided once per process)."""
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = choice() != "mkl" and _self_test()
    return _ONEDNN


def _self_test() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=generator) for shape in ((3, 40), (24, 40), (24,)))
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return y.shape == (3, 24) and bool(torch.allclose(y, torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-5))


def _onednn_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """oneDNN takes this product under the static rules: float32 on the CPU, a large enough weight."""
    return weight.numel() >= ONEDNN_MIN_WEIGHTS and _float32_cpu(x, weight, bias)


def _packed_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The weight's packed copy when the static rules give this product one (made on first need), else None."""
    if x.dim() != 2 or x.shape[0] < 2 or weight.numel() < PACKED_MIN_WEIGHTS or choice() != "auto":
        return None
    if not _onednn_fits(x, weight, bias):
        return None
    return packed_copy(weight)


def packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight's packed copy, made on first need; None where the memory does not allow it (remembered)."""
    key = id(weight)
    if key not in _PACKED:
        _PACKED[key] = _pack(weight)
        weakref.finalize(weight, _PACKED.pop, key, None)  # a freed weight's id may be reused
    return _PACKED[key]


def drop_packed(weight: torch.Tensor) -> None:
    """Frees the weight's packed copy, if it has one (the tuner's, when no product is planned to use it)."""
    _PACKED.pop(id(weight), None)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if not memory_allows(weight.numel() * weight.element_size()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_FOR_ROWS)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def memory_allows(nbytes: int) -> bool:
    """Whether a copy of nbytes leaves PACK_RESERVE_FRACTION of the host's memory available (Linux)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
    except (OSError, ValueError, IndexError):
        return False
    total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    return available - nbytes >= PACK_RESERVE_FRACTION * total


def _weight_left_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and 2 <= x.shape[0] <= WEIGHT_LEFT_ROWS
        and x.dtype == weight.dtype
        and x.dtype in WEIGHT_LEFT_DTYPES
        and choice() in ("auto", "unpacked")
    )


def _weight_left(x, weight, bias):
    """(W x^T + b)^T, an (out, T) product read back transposed."""
    if bias is None:
        return torch.matmul(weight, x.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()


def _pointwise(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


# -- the measured plan (kernel_tuning.py) ---------------------------------------------------------

KERNELS = ("onednn", "packed", "left", "mkl")
PLAN_ROWS = (1, 2, 4, 8, 16, 64)  # the row counts measured; a product takes the plan of the next one up
_PLAN: dict[tuple[tuple[int, ...], torch.dtype], dict[int, tuple[str, ...]]] = {}  # weight shape -> rows -> ranking


def plan_rows(rows: int) -> int:
    """The measured row count whose ranking a product of `rows` rows follows."""
    for measured in PLAN_ROWS:
        if rows <= measured:
            return measured
    return PLAN_ROWS[-1]


def plan_for(weight: torch.Tensor) -> dict[int, tuple[str, ...]] | None:
    return _PLAN.get((tuple(weight.shape), weight.dtype))


def set_plan(weight: torch.Tensor, rankings: dict[int, tuple[str, ...]]) -> None:
    """Products with weights of this shape and dtype take, by row count, the first usable kernel of each ranking."""
    if set(rankings) != set(PLAN_ROWS) or any(not r or set(r) - set(KERNELS) for r in rankings.values()):
        raise ValueError(f"a plan ranks kernels of {KERNELS} for each of the row counts {PLAN_ROWS}")
    _PLAN[(tuple(weight.shape), weight.dtype)] = {rows: tuple(r) for rows, r in rankings.items()}


def _planned(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    plan = plan_for(weight)
    if plan is None or choice() not in ("auto", "unpacked") or not _float32_cpu(x, weight, bias):
        return None
    for name in plan[plan_rows(x.shape[0])]:
        if name != "packed" or (choice() == "auto" and packed_copy(weight) is not None):
            return name
    return None


def _float32_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Every kernel here can take this product: float32 rows on the CPU, a contiguous weight, oneDNN usable."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] > 0
        and weight.dim() == 2
        and weight.is_contiguous()
        and (bias is None or bias.dtype == torch.float32)
        and onednn_usable()
    )


def kernel_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The kernel this product takes: the measured plan's first usable one for its shape and row count, else the
    static rules (measured on a Zen 3 host, the module's docstring): packed, left, onednn, or mkl."""
    planned = _planned(x, weight, bias)
    if planned is not None:
        return planned
    if _packed_for(x, weight, bias) is not None:
        return "packed"
    if _weight_left_fits(x, weight):
        return "left"
    if _onednn_fits(x, weight, bias):
        return "onednn"
    return "mkl"


def run(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b by the named kernel (`packed` needs the weight's packed copy to exist)."""
    if name == "packed":
        return _pointwise(x, _PACKED[id(weight)], bias)
    if name == "left":
        return _weight_left(x, weight, bias).contiguous()
    if name == "onednn":
        return _pointwise(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, in) W^T + b for W (out, in): a new (T, out) tensor."""
    return run(kernel_for(x, weight, bias), x, weight, bias)


def linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b written into out (T, out), e.g. a reply slot in the client's arena."""
    name = kernel_for(x, weight, bias)
    if name == "left" and out.dtype == x.dtype:
        return out.copy_(_weight_left(x, weight, bias))
    if name in ("packed", "onednn") and out.dtype == torch.float32:
        return out.copy_(run(name, x, weight, bias))
    if bias is None:
        return torch.matmul(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)
