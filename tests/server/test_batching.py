"""Op-level batching across clients (Engine.handle_batch): results equal the solo ones, every client's
requests keep their order, a refused request leaves its companions be, and several clients decoding on
one real server share products and get exactly the tokens they get alone."""

from __future__ import annotations

import pytest
import torch
from conftest import token_ids
from support import FAMILY_MODELS, FEATURES, decode_at_once

from tsqp.server.engine import Engine
from tsqp.tee.compose import tee_model
from tsqp.tee.remote import InProcess
from tsqp.wire.protocol import Message

LAST_BITS = 1e-5  # row-batched GEMMs may block differently from one-row ones: last-bit differences only


class Recorder:
    """An InProcess link that keeps every request it passes, to replay them batched."""

    def __init__(self, engine: Engine, peer: bytes):
        self.link = InProcess(engine, peer=peer)
        self.peer = peer
        self.requests: list[tuple[Message, list[torch.Tensor]]] = []

    def __call__(self, method, args=None, tensors=(), session=None, reply_bytes=0):
        reply = self.link(method, args, tensors, session=session, reply_bytes=reply_bytes)
        request = Message({"id": 0, "method": method, "session": session, "args": args or {}}, list(tensors))
        self.requests.append((request, reply.tensors))
        return reply


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("batch-gqa", seed=500, **FEATURES["gqa"])


@pytest.mark.parametrize("feature", ["gqa", "attention_bias", "mlp_bias", "tied", "qwen2-gqa", "gemma3-gqa"])
def test_batched_products_equal_solo_ones(checkpoints, feature):
    """Three clients' prefills recorded solo; their linear requests replayed together, op by op (Llama's
    features, Qwen2's biases, Gemma 3's windows)."""
    path = checkpoints("batch-" + feature, seed=600, **{**FEATURES, **FAMILY_MODELS}[feature])
    engine = Engine(str(path))
    recorders = [Recorder(engine, peer=b"client-%d" % i) for i in range(3)]
    for i, recorder in enumerate(recorders):
        tee = tee_model(path, recorder)
        tee.attach()
        ids = token_ids(5 + 3 * i, seed=i)
        tee.ops.open_session(ids.shape[0] + 1)  # left open: the batched replay runs in these sessions
        tee.forward(ids)
    keyed = [[(r, req, out) for req, out in rec.requests if engine.batch_key(req)] for r, rec in enumerate(recorders)]
    # qkv of layer 0, then a layer's attn_out, gate_up and down_qkv (down of the last), lm_head
    assert len({len(k) for k in keyed}) == 1 and len(keyed[0]) == 3 * engine.config.num_layers + 2
    assert {req.header["method"] for _, req, _ in keyed[0]} >= {"down_qkv", "attn_out", "lm_head"}
    compared = 0
    for step in zip(*keyed, strict=True):  # the same op and layer of each client
        keys = {engine.batch_key(req) for _, req, _ in step}
        assert len(keys) == 1
        outcomes = engine.handle_batch([(recorders[r].peer, req, None) for r, req, _ in step])
        for (_, _, solo), outcome in zip(step, outcomes, strict=True):
            assert not isinstance(outcome, Exception), outcome
            args, batched = outcome
            assert args["batch"] == 3 and len(batched) == len(solo)  # a fused call's results too
            for got, alone in zip(batched, solo, strict=True):
                torch.testing.assert_close(got, alone, atol=LAST_BITS, rtol=LAST_BITS)
            compared += 1
    assert compared == 3 * len(keyed[0])


def test_a_refused_request_gets_its_error_and_the_others_their_results(model):
    engine = Engine(str(model))
    h = engine.config.hidden_size
    good = [Message({"id": i, "method": "lm_head", "args": {}}, [torch.randn(2, h)]) for i in range(2)]
    bad = Message({"id": 9, "method": "lm_head", "args": {}}, [torch.randn(2, h + 1)])
    outcomes = engine.handle_batch([(b"a", good[0], None), (b"b", bad, None), (b"c", good[1], None)])
    assert isinstance(outcomes[1], Exception) and "activation" in str(outcomes[1])
    for message, outcome in zip(good, (outcomes[0], outcomes[2]), strict=True):
        expected = message.tensors[0] @ engine.head.t()
        torch.testing.assert_close(outcome[1][0], expected, atol=LAST_BITS, rtol=LAST_BITS)
        assert outcome[0]["batch"] == 2


def test_requests_of_a_session_someone_else_owns_are_refused_in_a_batch(model):
    engine = Engine(str(model))
    tee = tee_model(model, InProcess(engine, peer=b"owner"))
    tee.attach()
    tee.ops.open_session(4)
    x = torch.randn(1, engine.config.hidden_size)
    args = {"layer": 0, "pos": 0}
    own = Message({"id": 1, "method": "qkv", "session": tee.ops.session, "args": args}, [x])
    stolen = Message({"id": 2, "method": "qkv", "session": tee.ops.session, "args": args}, [x])
    outcomes = engine.handle_batch([(b"owner", own, None), (b"thief", stolen, None)])
    assert not isinstance(outcomes[0], Exception)
    assert isinstance(outcomes[1], Exception) and "session" in str(outcomes[1])


def test_four_clients_decoding_on_one_server_share_products_and_get_their_solo_tokens(model):
    """Real sockets and arenas: four client threads decode at once; the server batches some requests."""
    prompts = [token_ids(4 + i, seed=40 + i).tolist() for i in range(4)]
    alone, together, stats = decode_at_once(model, prompts, [24] * 4)
    assert together == alone
    assert stats["batched"] > 0, "no request shared a product"
    sizes = {int(size): n for size, n in stats["batch_sizes"].items()}
    assert set(sizes) <= {1, 2, 3, 4} and sizes.get(1, 0) < sum(sizes.values())
    # every request that shared a product is counted once in its product's size
    assert sum(size * n for size, n in sizes.items() if size > 1) == stats["batched"]
    assert stats["sessions"] == 0 and stats["cache_bytes"] == 0


@pytest.mark.parametrize("name", ["qwen2-gqa", "gemma3-gqa"])
def test_two_clients_of_another_family_share_products_and_get_their_solo_tokens(checkpoints, name):
    """Qwen2's biases and Gemma 3's windows on one real server: two clients decode past the window at once."""
    path = checkpoints("batch-" + name, seed=600, **FAMILY_MODELS[name])
    prompts = [token_ids(5 + i, seed=70 + i).tolist() for i in range(2)]
    alone, together, stats = decode_at_once(path, prompts, [20, 20])
    assert together == alone
    assert stats["batched"] > 0, "no request shared a product"
