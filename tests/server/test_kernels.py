"""The server's linear kernel choice (kernels.py): oneDNN's float32 CPU products and the few-row products
with the weight on the left equal torch.matmul's within rounding and land in the slot they are given;
bfloat16 keeps torch.matmul."""

import pytest
import torch

from tsqp.server import kernels


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    """These small weights go through oneDNN too (by default only large ones do)."""
    monkeypatch.setattr(kernels, "ONEDNN_MIN_WEIGHTS", 0)


def _inputs(rows: int, dtype=torch.float32, bias: bool = True):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator).to(dtype)
    w = torch.randn(80, 96, generator=generator).to(dtype)
    b = torch.randn(80, generator=generator).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("bias", [True, False])
def test_the_products_equal_matmul_and_land_in_their_slot(rows, bias):
    x, w, b = _inputs(rows, bias=bias)
    expected = torch.addmm(b, x, w.t()) if bias else x @ w.t()
    out = torch.full((rows, 80), float("nan"))
    returned = kernels.linear_into(out, x, w, b)
    assert returned.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.linear(x, w, b), expected, rtol=1e-5, atol=1e-4)


def test_a_non_contiguous_input_is_multiplied_as_it_reads():
    x, w, b = _inputs(6)
    wide = torch.cat([x, x], dim=1)[:, ::2]  # strided: the same values as x, interleaved
    torch.testing.assert_close(kernels.linear(wide, w, b), torch.addmm(b, wide, w.t()), rtol=1e-5, atol=1e-4)


def test_onednn_is_taken_on_this_cpu_unless_turned_off(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(kernels, "_ONEDNN", None)
    assert kernels.onednn_usable() is True
    calls = []
    real = kernels._pointwise
    monkeypatch.setattr(kernels, "_pointwise", lambda *args: calls.append(1) or real(*args))
    x, w, b = _inputs(1)
    kernels.linear(x, w, b)
    assert calls == [1]
    kernels.linear(x.double(), w.double(), b.double())  # float64 (private mode's masked products): matmul
    assert calls == [1]
    monkeypatch.setenv("TSQP_CPU_LINEAR", "mkl")
    monkeypatch.setattr(kernels, "_ONEDNN", None)
    assert kernels.onednn_usable() is False
    kernels.linear(x, w, b)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_other_dtypes_keep_matmul(dtype):
    x, w, b = _inputs(4, dtype)
    out = torch.empty(4, 80, dtype=dtype)
    kernels.linear_into(out, x, w, b)
    assert torch.equal(out, torch.addmm(b, x, w.t()))


def test_small_weights_keep_matmul_and_large_ones_take_onednn(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(kernels, "ONEDNN_MIN_WEIGHTS", 80 * 96 + 1)
    calls = []
    real = kernels._pointwise
    monkeypatch.setattr(kernels, "_pointwise", lambda *args: calls.append(1) or real(*args))
    x, w, b = _inputs(1)
    torch.testing.assert_close(kernels.linear(x, w, b), torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-4)
    assert calls == []  # under the threshold: matmul
    wide = torch.cat([w, w])  # 160 x 96: over it
    torch.testing.assert_close(kernels.linear(x, wide), x @ wide.t(), rtol=1e-5, atol=1e-4)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_a_few_rows_go_with_the_weight_on_the_left_and_equal_matmul(monkeypatch, dtype, bias):
    calls = []
    real = kernels._weight_left
    monkeypatch.setattr(kernels, "_weight_left", lambda *args: calls.append(args[0].shape[0]) or real(*args))
    for rows in (1, 2, 5, kernels.WEIGHT_LEFT_ROWS, kernels.WEIGHT_LEFT_ROWS + 1):
        x, w, b = _inputs(rows, dtype, bias)
        expected = torch.addmm(b, x, w.t()) if bias else x @ w.t()
        out = torch.full((rows, 80), float("nan"), dtype=dtype)
        assert kernels.linear_into(out, x, w, b).data_ptr() == out.data_ptr()
        y = kernels.linear(x, w, b)
        assert y.is_contiguous()
        tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
        torch.testing.assert_close(out, expected, **tolerance)
        torch.testing.assert_close(y, expected, **tolerance)
    assert calls == [2, 2, 5, 5, kernels.WEIGHT_LEFT_ROWS, kernels.WEIGHT_LEFT_ROWS]  # linear_into's, linear's
    for name in ("onednn", "mkl"):
        monkeypatch.setenv("TSQP_CPU_LINEAR", name)
        kernels.linear(*_inputs(4, dtype, bias))
    assert len(calls) == 6, "TSQP_CPU_LINEAR=onednn and mkl keep the weight on the right"


@pytest.fixture
def packing(monkeypatch):
    """Weights of 80 x 96 count as large enough for a packed copy; the copies made are forgotten after."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(kernels, "PACKED_MIN_WEIGHTS", 80 * 96)
    monkeypatch.setattr(kernels, "_PACKED", {})
    packs = []
    real = kernels._pack
    monkeypatch.setattr(kernels, "_pack", lambda w: packs.append(w.shape) or real(w))
    return packs


@pytest.mark.parametrize("bias", [True, False])
def test_two_rows_and_more_use_a_packed_copy_made_once_and_equal_matmul(packing, bias):
    _, w, b = _inputs(1, bias=bias)
    for rows in (1, 2, 8, 33):
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        expected = torch.addmm(b, x, w.t()) if bias else x @ w.t()
        out = torch.full((rows, 80), float("nan"))
        assert kernels.linear_into(out, x, w, b).data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(kernels.linear(x, w, b), expected, rtol=1e-5, atol=1e-4)
        assert packing == ([] if rows == 1 else [(80, 96)]), "one row keeps the plain weight; the copy is made once"
    assert kernels._PACKED[id(w)] is not None and kernels._PACKED[id(w)].is_mkldnn


def test_a_freed_weight_drops_its_packed_copy(packing):
    x, w, b = _inputs(4)
    kernels.linear(x, w, b)
    assert id(w) in kernels._PACKED
    key = id(w)
    del w
    assert key not in kernels._PACKED


def test_no_packed_copy_without_the_memory_small_weights_or_when_switched_off(packing, monkeypatch):
    x, w, b = _inputs(4)
    big, small = torch.cat([w, w]), w[:40].contiguous()
    monkeypatch.setattr(kernels, "PACKED_MIN_WEIGHTS", 160 * 96)
    kernels.linear(x, small, b[:40])
    assert packing == [], "under PACKED_MIN_WEIGHTS"
    for name in ("unpacked", "onednn", "mkl"):
        monkeypatch.setenv("TSQP_CPU_LINEAR", name)
        torch.testing.assert_close(kernels.linear(x, big), x @ big.t(), rtol=1e-5, atol=1e-4)
    assert packing == [], "TSQP_CPU_LINEAR other than auto makes no copy"
    monkeypatch.delenv("TSQP_CPU_LINEAR")
    monkeypatch.setattr(kernels, "PACK_RESERVE_FRACTION", 1.0)  # no host has all its memory available
    torch.testing.assert_close(kernels.linear(x, big), x @ big.t(), rtol=1e-5, atol=1e-4)
    assert packing == [(160, 96)] and kernels._PACKED[id(big)] is None, "refused for memory: the plain weight"
    kernels.linear(x, big)
    assert packing == [(160, 96)], "a refusal is remembered, not asked again on every product"


def test_memory_allows_reads_the_host_memory():
    assert kernels.memory_allows(1 << 20) is True  # 1 MiB: every host that runs the tests has it
    assert kernels.memory_allows(1 << 60) is False
