"""Private mode's pad sources: the seed expansion, pool files made in the TEE, and a helper server.

Pools are checked against z W^T recomputed here from the checkpoint, every refusal is one line with no
pad used, and the helper path runs in process (with a lying helper) and as real CurveZMQ subprocesses.
"""

from __future__ import annotations

import math
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, free_port, reference_logits, run_tsqp, token_ids
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tsqp.errors import IntegrityError, TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.server.calls import Call
from tsqp.server.engine import Engine
from tsqp.stats import Stats
from tsqp.tee import pad_pool
from tsqp.tee.compose import attach, tee_model
from tsqp.tee.forward import TeeModel
from tsqp.tee.launcher import ServerProcess
from tsqp.tee.op_weights import load_weight, model_ops, product
from tsqp.tee.pad_pool import BLOCK_ROWS, MAGIC, NONCE, PoolError, PoolReader, fill, pool_key, streams
from tsqp.tee.pads import AHEAD_ROWS, Ahead, PadReuse, PoolPads
from tsqp.tee.private import PrivateOptions
from tsqp.tee.remote import InProcess, Synchronous
from tsqp.wire.curve import generate
from tsqp.wire.pad_seeds import SEED_BYTES, expand, new_seed

ATOL = 1e-3
TOKENS = 40  # a full block of BLOCK_ROWS and a partial one
F32 = torch.float32


@pytest.fixture(scope="module")
def ckpt(tiny_model) -> Checkpoint:
    return Checkpoint(tiny_model)


def make_pool(ckpt, folder, tokens=TOKENS, wire=F32, fingerprint=None):
    return fill(ckpt, fingerprint or ckpt.fingerprint(), wire, tokens, folder)[0]


def open_pool(ckpt, path, folder=None):
    return PoolReader(path, pool_key(folder or path.parent), ckpt.fingerprint(), F32, streams(ckpt))


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def first_block(path) -> int:
    """File offset of stream 0's block 0 (after MAGIC, the header length, its nonce and sealed header)."""
    (length,) = struct.unpack("<I", path.read_bytes()[len(MAGIC) : len(MAGIC) + 4])
    return len(MAGIC) + 4 + NONCE + length


def assert_refused(ckpt, path, fragment, folder=None):
    with pytest.raises(PoolError) as info:
        open_pool(ckpt, path, folder)
    message = str(info.value)
    assert fragment in message and "\n" not in message and path.name in message, message
    assert not path.exists()  # claimed before it was judged: nobody else gets it either


def ids_arg(ids) -> str:
    return ",".join(map(str, ids.tolist()))


# -- the seed expansion -----------------------------------------------------------------------


def reference_expand(seed: bytes, rows: int, width: int) -> np.ndarray:
    """The documented contract, written out: AES-256-CTR keystream from counter 0, 52-bit uniforms,
    Box-Muller per row (first half radii, second half angles; r sin first, then r cos)."""
    even = width + width % 2
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(rows * even * 8))
    u = (np.frombuffer(stream, "<u8").reshape(rows, even) & ((1 << 52) - 1)).astype(np.float64) * 2.0**-52
    radius, angle = np.sqrt(-2.0 * np.log(1.0 - u[:, : even // 2])), 2 * math.pi * u[:, even // 2 :]
    return np.concatenate([radius * np.sin(angle), radius * np.cos(angle)], axis=1)[:, :width]


@pytest.mark.parametrize("width", [1, 2, 7, 32, 33])
def test_expand_is_deterministic_and_seekable(width):
    seed = new_seed()
    whole = expand(seed, 11, width)
    assert whole.dtype == torch.float64 and whole.shape == (11, width)
    assert torch.equal(whole, expand(seed, 11, width))
    np.testing.assert_allclose(whole.numpy(), reference_expand(seed, 11, width), rtol=1e-12, atol=1e-12)
    for start, rows in [(0, 3), (1, 1), (4, 7), (10, 1)]:
        assert torch.equal(expand(seed, rows, width, start_row=start), whole[start : start + rows])
    assert not torch.equal(expand(seed, 3, width, start_row=1), whole[:3])


def test_expand_is_standard_gaussian_and_seeds_are_independent():
    a, b = expand(new_seed(), 1000, 257), expand(new_seed(), 1000, 257)
    n = a.numel()  # 257000: the mean's standard error is 0.002
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1.0) < 0.01
    assert abs(float((a.abs() > 1.96).double().mean()) - 0.05) < 0.003  # Gaussian tails, not uniform ones
    assert abs(float((a * b).sum()) / n) < 0.01  # two seeds: uncorrelated
    assert abs(float((a[:, :-1] * a[:, 1:]).mean())) < 0.01  # neighbours within a row too
    assert abs(float((a[:-1] * a[1:]).mean())) < 0.01  # and across rows
    assert len({expand(new_seed(), 1, 8)[0, 0].item() for _ in range(50)}) == 50


@pytest.mark.parametrize("seed", [bytes(SEED_BYTES - 1), bytes(SEED_BYTES + 1), b"", "x" * SEED_BYTES])
def test_expand_refuses_a_wrong_seed(seed):
    with pytest.raises(ValueError, match="32 bytes"):
        expand(seed, 2, 4)


# -- pool files -------------------------------------------------------------------------------


def test_pool_serves_exactly_its_tokens_with_the_right_products(ckpt, tmp_path):
    path = make_pool(ckpt, tmp_path)
    pads = PoolPads(ckpt, ckpt.fingerprint(), F32, tmp_path, Stats())
    pads.reserve(TOKENS)
    assert not path.exists() and pads.claimed_tokens == TOKENS and pads.computed_tokens == 0
    assert pads.left() == TOKENS
    seen = set()
    for op in model_ops(ckpt.config):
        weight = load_weight(ckpt, op, F32, torch.float64)[0]
        for rows in (30, TOKENS - 30):  # the second take spans the end of block 0 and block 1
            pad = pads.start(op, rows)
            zw = pad.result()
            assert pad.z.shape == (rows, weight.shape[1]) and zw.shape == (rows, weight.shape[0])
            torch.testing.assert_close(zw, pad.z @ weight.T, rtol=0, atol=1e-12)
            seen.add(pad.z[0, 0].item())
            with pytest.raises(PadReuse):
                pad.result()
    assert len(seen) == 2 * len(model_ops(ckpt.config))  # every pad fresh
    assert pads.readers == [] and pads.computed_tokens == 0  # all used up, every reader closed
    pads.start(model_ops(ckpt.config)[0], 1)  # one row more: computed now, not taken from the pool
    assert pads.computed_tokens == 1
    pads.close()


def test_one_row_takes_are_cut_from_rows_expanded_ahead_and_erased(ckpt, tmp_path):
    """A decode's one-row takes: each row its seed's own, fresh, and erased from the rows held once taken."""
    make_pool(ckpt, tmp_path)
    pads = PoolPads(ckpt, ckpt.fingerprint(), F32, tmp_path, Stats())
    pads.reserve(TOKENS)
    op = model_ops(ckpt.config)[1]
    stream, weight = pads.index[op], load_weight(ckpt, op, F32, torch.float64)[0]
    taken = AHEAD_ROWS + 3  # past the first rows held: a second expansion
    zs = []
    for _ in range(taken):
        pad = pads.start(op, 1)
        torch.testing.assert_close(pad.result(), pad.z @ weight.T, rtol=0, atol=1e-12)
        zs.append(pad.z.clone())
    seed, first, held = pads.ahead[stream]
    assert first == AHEAD_ROWS and torch.all(held[:3] == 0) and torch.all(held[3:].abs().sum(1) > 0)
    assert torch.equal(torch.cat(zs[AHEAD_ROWS:]), expand(seed, 3, weight.shape[1], start_row=AHEAD_ROWS))
    assert torch.unique(torch.cat(zs), dim=0).shape[0] == taken
    rest = pads.start(op, TOKENS - taken)  # a long take goes on from the next row, past the rows held
    torch.testing.assert_close(rest.result(), rest.z @ weight.T, rtol=0, atol=1e-12)
    assert torch.equal(rest.z[: AHEAD_ROWS - 3], expand(seed, AHEAD_ROWS - 3, weight.shape[1], start_row=taken))
    assert torch.all(held == 0) and stream not in pads.ahead  # the rows it held were handed out by that take
    other = model_ops(ckpt.config)[2]
    pads.start(other, 1)
    held = pads.ahead[pads.index[other]][2]
    assert torch.all(held[1:].abs().sum(1) > 0)
    pads.close()
    assert torch.all(held == 0) and pads.ahead == {}  # rows expanded ahead and never used: erased


def test_the_next_ops_pad_is_taken_ahead_in_order_and_a_pad_not_asked_for_is_erased(ckpt, tmp_path):
    """`Ahead`: each op's pad is the pool's, with the right z W^T; the step's next op is taken by the worker
    thread (long takes only); a pad taken ahead and then not asked for is erased, its rows spent and never
    handed out."""
    make_pool(ckpt, tmp_path)
    stats = Stats()
    pool = PoolPads(ckpt, ckpt.fingerprint(), F32, tmp_path, stats)
    taken = []  # every pad the pool handed out, and whether the worker thread took it
    start = pool.start

    def recorded(op, rows, *label):
        taken.append((start(op, rows, *label), threading.current_thread() is not threading.main_thread()))
        return taken[-1][0]

    pool.start = recorded
    pads = Ahead(pool, ckpt.config)
    pads.reserve(TOKENS)
    ops, rows = model_ops(ckpt.config), AHEAD_ROWS
    for op in ops:  # one step: qkv of layer 0 taken when asked, every later layer op ahead
        pad = pads.start(op, rows)
        weight = load_weight(ckpt, op, F32, torch.float64)[0]
        torch.testing.assert_close(pad.result(), pad.z @ weight.T, rtol=0, atol=1e-12)
    assert [pad.op for pad, _ in taken] == ops
    assert [ahead for _, ahead in taken] == [False] + [True] * (len(ops) - 2) + [False]  # LM head: when asked
    assert stats.tee_ops["pads ahead"].count == len(ops) - 2 and pads.pending is None
    pads.start(ops[0], rows)  # takes ops[1] ahead ...
    short = pads.start(ops[1], 3)  # ... asked for 3 rows: that pad erased unused, 3 taken now, none ahead
    unused = taken[-2][0]
    assert unused.op == ops[1] and unused.used and torch.all(unused.z == 0) and pads.pending is None
    assert taken[-1][0] is short and not taken[-1][1]
    assert pool.readers[0].left(pool.index[ops[1]]) == TOKENS - 2 * rows - 3
    firsts = [float(row[0]) for p, _ in taken if p is not unused for row in p.z]
    assert len(set(firsts)) == len(firsts) == rows * (len(ops) + 1) + 3  # no row twice
    pads.start(ops[2], rows)
    assert pads.pending is not None
    pads.close()
    assert torch.all(taken[-1][0].z == 0) and pads.worker is None  # the last take ahead (ops[3]) erased


def test_reader_hands_out_rows_once_and_erases_them(ckpt, tmp_path):
    path = make_pool(ckpt, tmp_path)
    reader = open_pool(ckpt, path)
    assert not path.exists() and list(tmp_path.glob("*.pads")) == []
    layout = streams(ckpt)
    stream = 2
    weight = load_weight(ckpt, layout[stream].op, F32, torch.float64)[0]
    seeds, zw = reader.take(stream, 5)
    assert reader.left(stream) == TOKENS - 5 and reader.left(0) == TOKENS
    [(seed, first, n)] = seeds
    assert (first, n) == (0, 5) and zw.shape == (5, layout[stream].out)
    torch.testing.assert_close(zw, expand(seed, 5, layout[stream].width) @ weight.T, rtol=0, atol=1e-12)
    held = reader.open_block[stream][-1]
    assert torch.all(held[:5] == 0) and torch.all(held[5:].abs().sum(1) > 0)
    seeds, zw = reader.take(stream, BLOCK_ROWS)  # the rest of block 0 and 5 rows of block 1: one seed's run
    assert [(f, n) for _, f, n in seeds] == [(5, BLOCK_ROWS)] and seeds[0][0] == seed
    z = torch.cat([expand(s, n, layout[stream].width, start_row=f) for s, f, n in seeds])
    torch.testing.assert_close(zw, z @ weight.T, rtol=0, atol=1e-12)
    assert reader.left(stream) == TOKENS - 5 - BLOCK_ROWS
    with pytest.raises(TsqpError, match="rows left"):
        reader.take(stream, TOKENS)
    reader.close()


def test_altered_header_is_refused(ckpt, tmp_path):
    path = make_pool(ckpt, tmp_path)
    flip(path, len(MAGIC) + 4 + NONCE + 5)
    assert_refused(ckpt, path, "failed authentication")


@pytest.mark.parametrize("stream, block", [(0, 1), (3, 0)])
def test_altered_block_is_refused_when_read(ckpt, tmp_path, stream, block):
    path = make_pool(ckpt, tmp_path)
    layout = streams(ckpt)
    sizes = [s.block_bytes(BLOCK_ROWS) + s.block_bytes(TOKENS - BLOCK_ROWS) for s in layout]
    flip(path, first_block(path) + sum(sizes[:stream]) + block * layout[stream].block_bytes(BLOCK_ROWS) + NONCE + 50)
    reader = open_pool(ckpt, path)  # the header is intact
    if block:
        reader.take(stream, BLOCK_ROWS)  # block 0 is still good
    with pytest.raises(PoolError, match=f"block {block} of {layout[stream].op} failed authentication") as info:
        reader.take(stream, 3)
    assert "\n" not in str(info.value) and "none of its pads used" in str(info.value)
    assert reader.left(stream) == TOKENS - block * BLOCK_ROWS and stream not in reader.open_block
    reader.take(1, TOKENS)  # other streams are unaffected
    reader.close()


@pytest.mark.parametrize("source", ["same pool", "other pool"])
def test_moved_block_is_refused(ckpt, tmp_path, source):
    """Blocks are bound to their pool, stream and index: qkv of layer 0's block 0 replaced by layer 1's
    (same shape, same file) or by the same block of another pool made with the same key."""
    path, other = make_pool(ckpt, tmp_path), make_pool(ckpt, tmp_path)
    layout = streams(ckpt)
    block = layout[0].block_bytes(BLOCK_ROWS)
    stream_bytes = block + layout[0].block_bytes(TOKENS - BLOCK_ROWS)
    assert layout[4].op.name == "qkv" and layout[4].op.layer == 1
    data, start = bytearray(path.read_bytes()), first_block(path)
    donor, at = (path, start + 4 * stream_bytes) if source == "same pool" else (other, first_block(other))
    data[start : start + block] = donor.read_bytes()[at : at + block]
    path.write_bytes(bytes(data))
    reader = open_pool(ckpt, path)
    with pytest.raises(PoolError, match="block 0 of qkv of layer 0 failed authentication"):
        reader.take(0, 1)
    reader.close()


SIZE_EDITS = {
    "one byte cut": (lambda data, start: data[:-1], "truncated or padded"),
    "a block cut": (lambda data, start: data[:-200], "truncated or padded"),
    "bytes appended": (lambda data, start: data + bytes(7), "truncated or padded"),
    "cut in the header": (lambda data, start: data[: start - 3], "failed authentication"),
    "cut in the magic": (lambda data, start: data[:10], "not a TSQP pad pool"),
}


@pytest.mark.parametrize("edit", SIZE_EDITS)
def test_truncated_or_padded_pool_is_refused(ckpt, tmp_path, edit):
    cut, fragment = SIZE_EDITS[edit]
    path = make_pool(ckpt, tmp_path)
    path.write_bytes(cut(path.read_bytes(), first_block(path)))
    assert_refused(ckpt, path, fragment)


def test_pool_of_another_model_is_refused(ckpt, other_model, tmp_path):
    other = Checkpoint(other_model)
    assert other.config == ckpt.config and other.fingerprint() != ckpt.fingerprint()
    path = make_pool(other, tmp_path, fingerprint=other.fingerprint())
    disguised = path.rename(tmp_path / path.name.replace(other.fingerprint()[:16], ckpt.fingerprint()[:16]))
    pads = PoolPads(ckpt, ckpt.fingerprint(), F32, tmp_path, Stats())
    with pytest.raises(PoolError, match="made for another model") as info:
        pads.reserve(4)  # the renamed file is picked up, and refused
    assert "\n" not in str(info.value) and pads.readers == [] and pads.computed_tokens == 0
    assert not disguised.exists()


def test_pool_of_another_dtype_is_refused(ckpt, tmp_path):
    path = make_pool(ckpt, tmp_path, wire=torch.bfloat16)
    assert_refused(ckpt, path, "made for a bfloat16 server, this one is float32")


def test_pool_of_another_key_is_refused(ckpt, tmp_path):
    path = make_pool(ckpt, tmp_path / "a")
    assert pool_key(tmp_path / "b") != pool_key(tmp_path / "a")
    shutil.move(path, tmp_path / "b" / path.name)
    assert_refused(ckpt, tmp_path / "b" / path.name, "another pool key")


def test_pools_are_claimed_oldest_first_and_topped_up(ckpt, tmp_path):
    older, newer = make_pool(ckpt, tmp_path, tokens=6), make_pool(ckpt, tmp_path, tokens=5)
    stamp = older.name.split("-")[2]  # names sort by their time stamp (to the second)
    older = older.rename(tmp_path / older.name.replace(stamp, "20000101000000"))
    pads = PoolPads(ckpt, ckpt.fingerprint(), F32, tmp_path, Stats())
    pads.reserve(6)  # the older pool is enough
    assert (pads.claimed_tokens, pads.computed_tokens) == (6, 0) and not older.exists() and newer.exists()
    pads.reserve(14)  # the newer pool too (11 tokens in all), and 3 computed
    assert (pads.claimed_tokens, pads.computed_tokens, pads.left()) == (11, 3, 14)
    assert list(tmp_path.glob("*.pads")) == []
    pads.close()


def test_interrupted_fill_leaves_no_file(ckpt, tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            assert list(tmp_path.glob("*.partial")), "fill writes a partial file as it goes"
            raise RuntimeError("interrupted")
        return product(*args, **kwargs)

    monkeypatch.setattr(pad_pool, "product", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_pool(ckpt, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.key"]


# -- `tsqp pads` and `tsqp logits --private` --------------------------------------------------


def test_cli_pads_then_private_logits(tiny_model, tiny_reference, tmp_path):
    ids = token_ids(9)
    made = run_tsqp("pads", "--model", tiny_model, "--tokens", len(ids), "--pads-dir", tmp_path / "pads")
    assert made.returncode == 0, made.stderr
    path = Path(made.stdout.strip())
    assert path.parent == tmp_path / "pads" and path.suffix == ".pads" and path.is_file()
    assert "pads for 9 tokens" in made.stderr
    out = tmp_path / "logits.npy"
    run = run_tsqp(
        "logits", "--private", "--pads-dir", tmp_path / "pads", "--model", tiny_model,
        "--token-ids", ids_arg(ids), "--out", out,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert not path.exists() and list((tmp_path / "pads").glob("*.pads")) == []
    got = torch.from_numpy(np.load(out))
    assert float((got - reference_logits(tiny_reference, ids)).abs().max()) < ATOL


def test_cli_tampered_pool_is_one_error_line(ckpt, tiny_model, tmp_path):
    path = make_pool(ckpt, tmp_path, tokens=4)
    flip(path, len(MAGIC) + 4 + NONCE + 9)
    result = run_tsqp(
        "logits", "--private", "--pads-dir", tmp_path, "--model", tiny_model,
        "--token-ids", "1,2,3,4", "--out", tmp_path / "x.npy",
    )  # fmt: skip
    assert_one_line_error(result, "pad pool", path.name, "failed authentication")
    assert not (tmp_path / "x.npy").exists()


# -- a helper server --------------------------------------------------------------------------


class LyingHelper(Engine):
    """A helper whose pad for layer 1's down is wrong: one element nudged, or another seed's pad."""

    def __init__(self, model_dir: str, kind: str = "honest"):
        super().__init__(model_dir)
        self.kind, self.served = kind, 0

    def step_pad(self, calls):
        (call,) = calls
        args = call.args
        self.served += 1
        if self.kind == "honest" or (args["op"], args["layer"]) != ("down", 1):
            return super().step_pad(calls)
        if self.kind == "other-seed":
            return super().step_pad([Call("pad", {**args, "seed": new_seed()})])
        [[zw]] = super().step_pad(calls)
        zw[0, 3] += 1e-6 * float(zw.abs().max())
        return [[zw]]


def helper_tee(model, engine, tmp_path) -> TeeModel:
    options = PrivateOptions(pads_dir=tmp_path / "pads", helper=Synchronous(InProcess(engine)))
    tee = tee_model(model, InProcess(Engine(str(model))), private=options)
    attach(tee)
    return tee


def test_helper_logits_match_transformers(tiny_model, tiny_reference, tmp_path):
    ids = token_ids(21)
    helper = LyingHelper(str(tiny_model))
    tee = helper_tee(tiny_model, helper, tmp_path)
    tee.ops.open_session(len(ids))
    got = tee.forward(ids)
    assert float((got - reference_logits(tiny_reference, ids)).abs().max()) < ATOL
    assert helper.served == len(model_ops(tee.config))  # one pad per linear
    assert not (tmp_path / "pads").exists()  # nothing precomputed, not even a pool key


@pytest.mark.parametrize("kind", ["nudge", "other-seed"])
def test_lying_helper_is_caught(tiny_model, tmp_path, kind):
    tee = helper_tee(tiny_model, LyingHelper(str(tiny_model), kind), tmp_path)
    tee.ops.open_session(8)
    with pytest.raises(IntegrityError) as info:
        tee.forward(token_ids(8))
    message = str(info.value)
    assert "the helper's pad for down of layer 1 result is wrong" in message and "this helper" in message


@pytest.fixture(scope="module")
def helper_keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("helper") / "keys"
    generate(folder)
    return folder


def test_cli_helper_over_curve(tiny_model, tiny_reference, helper_keys, tmp_path):
    ids = token_ids(13)
    out = tmp_path / "logits.npy"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with ServerProcess(str(tiny_model), endpoint=endpoint, start_timeout_s=60, curve_keys=helper_keys):
        result = run_tsqp(
            "logits", "--private", "--helper", endpoint, "--helper-curve-keys", helper_keys,
            "--pads-dir", tmp_path / "pads", "--model", tiny_model, "--token-ids", ids_arg(ids), "--out", out,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = torch.from_numpy(np.load(out))
    assert float((got - reference_logits(tiny_reference, ids)).abs().max()) < ATOL
    assert not (tmp_path / "pads").exists()  # pads from the helper: no pool, not even a pool key


def test_cli_tcp_helper_needs_curve_keys(tiny_model, tmp_path):
    result = run_tsqp(
        "logits", "--helper", f"tcp://127.0.0.1:{free_port()}", "--model", tiny_model,
        "--token-ids", "1,2", "--out", tmp_path / "x.npy",
    )  # fmt: skip
    assert_one_line_error(result, "--helper-curve-keys")
