"""A prefill's attention checks over many query tiles (attention_check.py): each tile's scores are taken as
they come and compared once per chunk, each row against its own tile's K^T r and tolerance. A lie in any
tile, of scores or of the attn_out rows that tile's probabilities fold into, is caught, naming the op and
layer, and no attn_out is asked for from scores that did not pass.
"""

from __future__ import annotations

import pytest
import torch

from tsqp.errors import IntegrityError
from tsqp.server.engine import Engine
from tsqp.tee.compose import tee_model
from tsqp.tee.remote import InProcess
from tsqp.wire.protocol import query_tiles

LAYER = 1
TILE = 3
PROMPT = torch.tensor([3, 17, 42, 7, 99, 150, 11, 5, 23, 61, 88, 140])  # four tiles of three rows


class TileLiar(Engine):
    """An engine that tampers with one element of layer 1's scores or attn_out in one query tile."""

    def __init__(self, model_dir, dtype: str):
        super().__init__(str(model_dir), dtype=dtype)
        self.plan: tuple[str, int] | None = None  # (method, tile index)
        self.methods: list[tuple[str, int | None]] = []

    def handle(self, peer, request, *rest, **options):
        reply_args, results = super().handle(peer, request, *rest, **options)
        method, args = request.header["method"], request.args
        self.methods.append((method, args.get("layer")))
        if self.plan is not None and self.plan[0] == method and args.get("layer") == LAYER:
            heads = self.config.num_heads
            tiles, _ = query_tiles(len(PROMPT), args["pos"], heads, args["tile"], args.get("window"))
            t = tiles[self.plan[1]]
            if method == "scores":
                block = results[0][t.offset : t.offset + heads * t.rows * t.keys].view(heads, t.rows, t.keys)
                block[heads - 1, t.rows - 1, 0] += block.abs().max()  # the last head's last row, key 0
            else:
                results[0][t.row + t.rows - 1, 0] += results[0].abs().max()  # the tile's last row
        return reply_args, results


def prefill(model, engine: TileLiar, verify: bool) -> torch.Tensor:
    engine.sessions.clear()
    engine.methods.clear()
    tee = tee_model(model, InProcess(engine), verify=verify)
    tee.ops.attention.tile = TILE
    tee.attach()
    tee.ops.open_session(len(PROMPT))
    try:
        return tee.forward(PROMPT)
    finally:
        tee.ops.close_session()


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("lying-gqa-bias", seed=5, num_key_value_heads=2, attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tile", range(4))
@pytest.mark.parametrize("method", ["scores", "attn_out"])
def test_a_lie_in_any_tile_is_caught(model, dtype, tile, method):
    engine = TileLiar(model, dtype)
    honest = prefill(model, engine, verify=True)
    assert len(query_tiles(len(PROMPT), 0, engine.config.num_heads, TILE)[0]) == 4
    engine.plan = (method, tile)
    with pytest.raises(IntegrityError, match=f"server's {method} of layer {LAYER} result is wrong"):
        prefill(model, engine, verify=True)
    if method == "scores":  # the probabilities of unchecked scores were never submitted
        assert ("attn_out", LAYER) not in engine.methods
    unverified = prefill(model, engine, verify=False)  # the same lie unchecked: it changes the logits
    assert not torch.allclose(unverified, honest, atol=1e-3)
