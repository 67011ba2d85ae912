"""Decode steps of several generations as the rows of one step (`TeeModel.forward_rows`, api/batcher.py).

A batched step's row must give the logits that sequence's own decode step gives (every family: windows,
q/k norms, soft-caps, GQA), several generations decoding through one `DecodeBatcher` must give the
tokens each gives alone, and a lying server must be caught in a batched step, failing every row in it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch
from conftest import token_ids
from lying_server import LyingEngine, Tamper
from support import FAMILY_MODELS

from tsqp.api.batcher import DecodeBatcher
from tsqp.errors import IntegrityError
from tsqp.server.engine import Engine
from tsqp.tee.compose import ROWS, tee_model
from tsqp.tee.generate import generate
from tsqp.tee.remote import InProcess

LENGTHS = [5, 19, 11, 40]  # prompts of different lengths: every row at its own position


def attached(path, engine, attention: str):
    tee = tee_model(path, InProcess(engine), attention=attention)
    tee.attach()
    return tee


@pytest.mark.parametrize("attention", ["tee", "decode"])
@pytest.mark.parametrize("name", ["llama", *FAMILY_MODELS])
def test_each_row_equals_its_own_decode_step(checkpoints, tiny_model, name, attention):
    """Four sequences prefilled apart (attention in the TEE, or on the server then kept in the TEE), then
    one batched step: row i equals sequence i's own step at its position, within float32 rounding."""
    path = tiny_model if name == "llama" else checkpoints("family-" + name, seed=41, **FAMILY_MODELS[name])
    engine = Engine(str(path))
    vocab = engine.config.vocab_size
    sequences, nexts = [], []
    for i, length in enumerate(LENGTHS):
        tee = attached(path, engine, attention)
        if attention == "decode":
            tee.ops.attention.rows = 2  # these prompts are prefills on the server
        tee.ops.open_session(length + 1)
        tee.forward(token_ids(length, vocab, seed=10 + i), 0)
        sequences.append(tee)
        nexts.append(int(token_ids(1, vocab, seed=50 + i)[0]))
    rows = attached(path, engine, ROWS)
    rows.ops.open_session(len(LENGTHS))
    rows.ops.attention.rows = [(t.ops.attention.cache, n) for t, n in zip(sequences, LENGTHS, strict=True)]
    batched = rows.forward_rows(torch.tensor(nexts), torch.tensor(LENGTHS))
    assert batched.shape == (len(LENGTHS), vocab)
    assert rows.ops.checker.checks["o_proj"] > 0 and "scores" not in rows.ops.checker.checks
    for i, (tee, length) in enumerate(zip(sequences, LENGTHS, strict=True)):
        alone = tee.forward(torch.tensor([nexts[i]]), length)  # rewrites the same cache position
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-4, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3), "the rows do not differ: the test tests nothing"


@contextmanager
def rows_model(path, engine):
    yield attached(path, engine, ROWS)


def generations_at_once(path, batcher, engines, prompts, lengths) -> list:
    """Each prompt generated greedily by its own thread and model, the decode steps through batcher;
    the first tokens wait on each other, so that the decode steps overlap."""
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            tee = attached(path, engines[i], "tee")
            first = [True]

            def on_token(token: int) -> None:
                if first[0]:
                    first[0] = False
                    barrier.wait(timeout=60)

            with batcher.generation(lambda: tee.ops.attention.cache) as decode:
                results[i] = generate(tee, prompts[i], lengths[i], on_token=on_token, decode=decode).generated_ids
        except BaseException as exc:  # noqa: BLE001 - compared below
            results[i] = exc
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_generations_through_the_batcher_equal_each_alone(tiny_model):
    vocab = Engine(str(tiny_model)).config.vocab_size
    prompts = [token_ids(n, vocab, seed=70 + n).tolist() for n in LENGTHS]
    lengths = [12, 7, 12, 9]  # one ends early: the others go on in smaller steps
    solo = attached(tiny_model, Engine(str(tiny_model)), "server")
    alone = [generate(solo, p, n).generated_ids for p, n in zip(prompts, lengths, strict=True)]
    engines = [Engine(str(tiny_model)) for _ in prompts]  # an Engine serves one thread at a time
    batcher = DecodeBatcher(lambda: rows_model(tiny_model, Engine(str(tiny_model))), rows=4, gather_s=0.5)
    try:
        together = generations_at_once(tiny_model, batcher, engines, prompts, lengths)
    finally:
        batcher.close()
    assert together == alone
    assert batcher.rows == sum(lengths) - len(lengths)  # every decode step went through it
    assert batcher.rows > batcher.steps  # and steps held more than one row


def test_a_lie_in_a_batched_step_fails_every_row_and_the_next_model_is_fresh(tiny_model):
    vocab = Engine(str(tiny_model)).config.vocab_size
    prompts = [token_ids(n, vocab, seed=90 + n).tolist() for n in LENGTHS[:2]]
    liar = LyingEngine(tiny_model, plan=Tamper("gate_up", "up", "delta"))
    opened = []

    def open_model():
        opened.append(1)
        return rows_model(tiny_model, liar)

    batcher = DecodeBatcher(open_model, rows=2, gather_s=0.5)
    try:
        failed = generations_at_once(tiny_model, batcher, [Engine(str(tiny_model)) for _ in prompts], prompts, [4, 4])
        assert all(isinstance(result, IntegrityError) for result in failed), failed
        assert all("gate_up (up) of layer 1" in str(result) for result in failed)
        assert liar.tampered >= 1
        liar.plan = None  # an honest server again: the batcher's next step opens a fresh model and passes
        honest = generations_at_once(tiny_model, batcher, [Engine(str(tiny_model)) for _ in prompts], prompts, [4, 4])
        assert all(isinstance(tokens, list) and len(tokens) == 4 for tokens in honest), honest
        assert len(opened) == 2
    finally:
        batcher.close()
