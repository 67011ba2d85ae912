"""One attention chunk's checks in a prefill (verify.Immediate): scores and attn_out, fed tile by tile
(`server_attention.ServerAttention.attend`), compared once per chunk.

scores: S r over each tile's keys must equal q (K^T r) / sqrt(hd), where K^T r and sum ||k_j||^2 are the
totals of earlier calls plus this chunk's keys up to the tile's last row. That side is computed here,
before any tile arrives, for every tile at once: one batched product of the queries with each tile's K^T r
(kv heads, T group rows, tiles K columns), each row then taking its own tile's K columns. A tile's S r is
taken as it arrives (before the softmax overwrites the tile), and all of them are compared in one go in
`scores_done`, before the chunk's probabilities are submitted: nothing derived from an unchecked score
leaves the TEE (the probabilities are drafted in the arena, but submitted only after the check; in plain
mode the server knows q and k, so a draft computed from its own wrong scores tells it nothing new).

attn_out: sum_h P_h c_h per row, one product per tile from the probabilities as sent (each tile's
(heads, rows, K + 1) kept), summed over heads once per chunk and compared with y s_o when the server's
result comes. The tolerance factors that depend on a tile's key count are laid out per row here.

The same secret vectors and tolerances as call by call (verify.py derives them): a wrong result passes
with the same probability, 1/F^K for an element off by F times its tolerance.
"""

from __future__ import annotations

import math

import torch

from tsqp.errors import TsqpError
from tsqp.tee.checks import ChunkCheck
from tsqp.tee.freivalds import U32, UNIT_ROUNDOFF, VECTORS, linear_gains, score_gains, times, value_gain
from tsqp.wire.protocol import Tile, query_tiles

K = VECTORS


class AttentionCheck(ChunkCheck):
    """A chunk of T queries at pos: `scores` and `probs` per tile, `scores_done`, then `attn_out`."""

    def __init__(self, verifier, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, tile: int):
        self.verifier, self.layer, self.pos = verifier, layer, pos
        c, state, T = verifier.config, verifier.session_state(), q.shape[0]
        with verifier.stats.tee("verify"):
            if pos != 0 and pos != state.k_filled[layer]:
                raise TsqpError(
                    f"verified mode: scores of layer {layer} at position {pos} must append to the "
                    f"{state.k_filled[layer]} cached keys (or restart at 0)"
                )
            if state.c_filled[layer] < pos + T:
                raise TsqpError(
                    f"verified mode: attn_out of layer {layer} needs qkv of positions up to {pos + T} first"
                )
            q, k = q.float(), k.float()  # (T, heads, hd), (T, kv, hd) as sent
            kv, group, hd = c.num_kv_heads, c.group_size, c.head_dim
            self.window_keys: torch.Tensor | None = None  # a windowed layer's keys within reach, kept when checked
            tiles, _ = query_tiles(T, pos, c.num_heads, tile, c.family.windows[layer])
            kr, k_sq = self._key_sums(state, layer, pos, tiles, k)  # (tiles, K, kv, hd), (tiles, kv)
            self.kr_total, self.k_sq_total = kr[-1].clone(), k_sq[-1].clone()
            n, scale = len(tiles), 1.0 / math.sqrt(hd)
            rows = torch.tensor([t.rows for t in tiles])
            # each tile's rows (a run of them) against its own K^T r: one product per tile
            queries = q.view(T, kv, group, hd).transpose(0, 1).reshape(kv, T * group, hd)
            per_tile = kr.permute(0, 2, 3, 1)  # (tiles, kv, hd, K)
            if n == 1:
                products = torch.bmm(queries, per_tile[0])
                k_norm = k_sq.sqrt().view(1, kv)
            else:
                products = torch.cat(
                    [
                        torch.bmm(queries[:, t.row * group : (t.row + t.rows) * group], per_tile[i])
                        for i, t in enumerate(tiles)
                    ],
                    dim=1,
                )
                k_norm = k_sq.sqrt()[torch.repeat_interleave(torch.arange(n), rows)]  # (T, kv): each row its tile's
            rhs = products.view(kv, T, group, K).transpose(1, 2)  # (kv, group, T, K)
            self.rhs = rhs.reshape(c.num_heads, T, K) * scale
            q_norm = torch.linalg.vector_norm(q, dim=-1).view(T, kv, group)
            self.qk_norm = (q_norm * k_norm.mul(scale).unsqueeze(-1)).view(T, -1).T.unsqueeze(-1)  # (heads, T, 1)
            gains = [(*score_gains(UNIT_ROUNDOFF[verifier.wire], t.keys, hd), value_gain(c, t.keys)) for t in tiles]
            per_row = torch.tensor(gains).repeat_interleave(rows, dim=0)  # (T, 3): each row its tile's factors
            self.row_gain, self.floor = per_row[:, 0].view(1, T, 1), per_row[:, 1].view(1, T, 1)
            self.value_gains = per_row[:, 2].view(T, 1)  # value_gain over each row's keys
            self.lhs: list[torch.Tensor] = []  # each tile's S r (heads, rows, K), in row order
            self.norms: list[torch.Tensor] = []  # each tile's measured row norms, where they are measured
            self.weighted: list[torch.Tensor] = []  # each tile's P_h [c_h | bound on ||v||] (heads, rows, K + 1)
        self.T = T

    def _key_sums(self, state, layer: int, pos: int, tiles: list[Tile], k: torch.Tensor):
        """K^T r (tiles, K, kv, hd) and sum ||k_j||^2 (tiles, kv) over the keys each tile sees."""
        T, kv, hd = k.shape
        window = self.verifier.config.family.windows[layer]
        kr_before, k_sq_before = (state.kr[layer], state.k_sq[layer]) if pos else (0.0, 0.0)  # 0: a restart
        r, flat = state.r[pos : pos + T].T, k.reshape(T, kv * hd)  # (K, T), (T, kv hd)
        if window is not None:  # each tile's own window of the keys sent
            start, self.window_keys = state.window_keys(layer, pos, k)
            sums = [state.window_sums(start, self.window_keys, t.first, t.end) for t in tiles]
            return torch.stack([kr for kr, _ in sums]), torch.stack([k_sq for _, k_sq in sums])
        if len(tiles) == 1:  # every row sees all T keys (a decode step): no masks
            return (r @ flat).view(1, K, kv, hd) + kr_before, k.square().sum((0, 2)).view(1, kv) + k_sq_before
        # tile i's rows see the keys up to its last row: a lower-triangular mask over the T keys
        ends = torch.tensor([t.row + t.rows for t in tiles])
        upto = (torch.arange(T)[None, :] < ends[:, None]).float()  # (tiles, T)
        kr = ((upto[:, None, :] * r[None]) @ flat).view(-1, K, kv, hd) + kr_before
        return kr, upto @ k.square().sum(2) + k_sq_before

    def scores(self, tile: Tile, block: torch.Tensor) -> None:
        v = self.verifier
        with v.stats.tee("verify"):
            heads, r = block.shape[0], v.session_state().r
            # block @ r, not times(): for these short, wide blocks MKL's plain product is faster
            self.lhs.append((block.view(heads * tile.rows, tile.keys) @ r[tile.first : tile.end]).view(heads, -1, K))
            if not v.bounded_norms:
                self.norms.append(torch.linalg.vector_norm(block, dim=2, keepdim=True))

    def scores_done(self) -> None:
        v, state = self.verifier, self.verifier.session_state()
        with v.stats.tee("verify"):
            if v.bounded_norms:
                tolerance = self.qk_norm * (self.row_gain + self.floor)
            else:
                tolerance = torch.cat(self.norms, dim=1) * self.row_gain + self.qk_norm * self.floor
            v.check("scores", self.layer, torch.cat(self.lhs, dim=1), self.rhs, tolerance)
        state.kr[self.layer], state.k_sq[self.layer] = self.kr_total, self.k_sq_total
        state.k_filled[self.layer] = self.pos + self.T
        if self.window_keys is not None:
            state.keep_recent(self.layer, self.window_keys)

    def probs(self, tile: Tile, block: torch.Tensor) -> None:
        v = self.verifier
        with v.stats.tee("verify"):
            cache = v.session_state().c[self.layer]  # (heads, K + 1, capacity)
            self.weighted.append(torch.bmm(block, cache[:, :, tile.first : tile.end].transpose(1, 2)))

    def attn_out(self, y: torch.Tensor) -> None:
        v = self.verifier
        with v.stats.tee("verify"):
            o, hidden = v.keys.layers[self.layer].o, v.config.hidden_size
            weighted = torch.cat(self.weighted, dim=1)  # (heads, T, K + 1)
            # sum_j P_hj ||v_j|| bounds ||O_h||; its rounding errors reach y s through u_h, whose entries the
            # o_proj omega bounds. Heads round independently: root of the sum of squares over heads.
            o_norm = torch.linalg.vector_norm(weighted[:, :, K], dim=0).unsqueeze(-1)  # (T, 1) >= ||O_row||
            y_norm = (
                o_norm * o.frobenius + o.bias_norm if v.bounded_norms else torch.linalg.vector_norm(y, dim=1)[:, None]
            )
            rounding, _ = linear_gains(UNIT_ROUNDOFF[v.wire], U32, hidden, hidden)
            tolerance = rounding * y_norm + o.omega * self.value_gains * o_norm
            v.check("attn_out", self.layer, times(y, o.s), weighted[:, :, :K].sum(0) + o.bias_s, tolerance)
