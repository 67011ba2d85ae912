"""Several generations' forward passes as the rows of one step (`TeeModel.forward_rows`, api/batcher.py).

A step's segments (decode rows and prompt chunks of different sequences, each at its own positions over
its own cache) must give the logits each sequence's own forward pass gives, in every family (windows,
q/k norms, soft-caps, GQA); generations run at once through one `StepBatcher` must give the tokens each
gives alone, a prompt longer than a step's rows running in chunks; a lying server must be caught in a
batched step, failing every generation in it, and the batcher must go on with a fresh model.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch
from conftest import token_ids
from lying_server import LyingEngine, Tamper
from support import FAMILY_MODELS

from tsqp.api.batcher import BatchedSequence, StepBatcher
from tsqp.errors import IntegrityError
from tsqp.server.engine import Engine
from tsqp.tee.attention import KVCache
from tsqp.tee.compose import ROWS, tee_model
from tsqp.tee.generate import generate
from tsqp.tee.remote import InProcess
from tsqp.tee.rows_attention import Segment

CACHED = [5, 19, 0, 40]  # positions each sequence holds before the step
ROWS_NOW = [1, 1, 7, 3]  # its rows in the step: decode steps, a fresh prompt, a prompt's next chunk


def attached(path, engine, attention: str):
    tee = tee_model(path, InProcess(engine), attention=attention)
    tee.attach()
    return tee


@pytest.mark.parametrize(
    "name, dtype", [("llama", "float32"), ("llama", "bfloat16"), *((n, "float32") for n in FAMILY_MODELS)]
)
def test_each_segment_equals_its_own_forward(checkpoints, tiny_model, name, dtype):
    """Four sequences at their own positions, one step for all: each segment's last row equals that
    sequence's own forward pass (attention in the TEE) over the same tokens, within float32 rounding (a
    bfloat16 server: its fused calls' inputs checked too, within its rounding)."""
    path = tiny_model if name == "llama" else checkpoints("family-" + name, seed=41, **FAMILY_MODELS[name])
    engine = Engine(str(path), dtype=dtype)
    vocab = engine.config.vocab_size
    alone, segments, tokens = [], [], []
    for i, (cached, rows) in enumerate(zip(CACHED, ROWS_NOW, strict=True)):
        tee = attached(path, engine, "tee")
        tee.ops.open_session(cached + rows)
        if cached:
            tee.forward(token_ids(cached, vocab, seed=10 + i), 0)
        alone.append(tee)
        segments.append(Segment(tee.ops.attention.cache, cached, rows))
        tokens.append(token_ids(rows, vocab, seed=50 + i))
    rows = attached(path, engine, ROWS)
    rows.ops.open_session(sum(ROWS_NOW))
    rows.ops.attention.segments = segments
    positions = torch.cat([torch.arange(s.pos, s.pos + s.rows) for s in segments])
    last = torch.tensor(ROWS_NOW).cumsum(0) - 1
    batched = rows.forward_rows(torch.cat(tokens), positions, last)
    assert batched.shape == (len(segments), vocab)
    assert rows.ops.checker.checks["o_proj"] > 0 and "scores" not in rows.ops.checker.checks
    assert rows.ops.fused and (rows.ops.checker.checks["input"] > 0) == (dtype == "bfloat16")
    for i, (tee, cached) in enumerate(zip(alone, CACHED, strict=True)):
        own = tee.forward(tokens[i], cached, last_only=True)  # rewrites the same cache positions
        torch.testing.assert_close(batched[i : i + 1], own, atol=1e-4 if dtype == "float32" else 0.05, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3), "the rows do not differ: the test tests nothing"


@contextmanager
def rows_model(path, engine):
    yield attached(path, engine, ROWS)


def at_once(batcher, prompts, lengths) -> list:
    """Each prompt generated greedily by its own thread over batcher, all started together."""
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        sequence = BatchedSequence(batcher)
        try:
            barrier.wait(timeout=60)
            results[i] = generate(sequence, prompts[i], lengths[i]).generated_ids
        except BaseException as exc:  # noqa: BLE001 - compared below
            results[i] = exc
        finally:
            sequence.close_session()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_generations_through_the_batcher_equal_each_alone(tiny_model):
    """Four generations at once, one prompt longer than a step (it runs in chunks), one ending early."""
    vocab = Engine(str(tiny_model)).config.vocab_size
    prompts = [token_ids(n, vocab, seed=70 + n).tolist() for n in (5, 19, 11, 40)]
    lengths = [12, 7, 12, 9]
    solo = attached(tiny_model, Engine(str(tiny_model)), "server")
    alone = [generate(solo, p, n).generated_ids for p, n in zip(prompts, lengths, strict=True)]
    batcher = StepBatcher(lambda: rows_model(tiny_model, Engine(str(tiny_model))), step_tokens=16, gather_s=0.5)
    try:
        together = at_once(batcher, prompts, lengths)
    finally:
        batcher.close()
    assert together == alone
    assert batcher.rows == sum(map(len, prompts)) + sum(lengths) - len(lengths)  # every forward pass's rows
    assert batcher.rows > batcher.steps  # steps held several rows
    assert batcher.open == 0 and not batcher.pending


def test_a_lie_in_a_batched_step_fails_every_generation_in_it_and_a_fresh_model_follows(tiny_model):
    vocab = Engine(str(tiny_model)).config.vocab_size
    prompts = [token_ids(n, vocab, seed=90 + n).tolist() for n in (6, 9)]
    liar = LyingEngine(tiny_model, plan=Tamper("gate_up", "up", "delta"))
    opened = []

    def open_model():
        opened.append(1)
        return rows_model(tiny_model, liar)

    batcher = StepBatcher(open_model, gather_s=0.5)
    try:
        failed = at_once(batcher, prompts, [4, 4])
        assert all(isinstance(result, IntegrityError) for result in failed), failed
        assert all("gate_up (up) of layer 1" in str(result) for result in failed)
        assert liar.tampered >= 1
        liar.plan = None  # an honest server again: the next step opens a fresh model, which passes
        honest = at_once(batcher, prompts, [4, 4])
        assert all(isinstance(tokens, list) and len(tokens) == 4 for tokens in honest), honest
        assert len(opened) >= 2 and batcher.tee is not None
    finally:
        batcher.close()


def test_a_sequence_must_append_to_its_cache(tiny_model):
    """A segment that would skip cached positions is refused before anything is sent for it."""
    rows = attached(tiny_model, Engine(str(tiny_model)), ROWS)
    rows.ops.open_session(4)
    cache = KVCache(rows.config, 16)
    rows.ops.attention.segments = [Segment(cache, 3, 1)]  # nothing cached before position 3
    with pytest.raises(Exception, match="do not fit|before their values"):
        rows.forward_rows(torch.tensor([7]), torch.tensor([3]), torch.tensor([0]))
