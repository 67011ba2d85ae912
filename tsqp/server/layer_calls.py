"""Plain mode's calls, mixed into the Engine: the embedding, each layer's fused linears and attention, the LM head.

Each `op_` validates a request (the Engine's helpers) and reserves what its step will allocate, then
resolves it into a Call; each `step_` runs the calls that share it on this rank's share (sharded.py).
Per-layer flow, as the TEE's forward pass calls it (DESIGN.md):

    qkv       x (T, hidden) -> [q | k] to the TEE for RoPE; v cached at [pos, pos+T) (and, with args.values,
              returned too: the TEE attends over its own cache, o_proj then a `linear` call)
    scores    q, k post-RoPE -> q k^T / sqrt(hd) packed by query tiles; k cached; the TEE runs the softmax
    attn_out  probs -> o_proj(probs @ V)

scores and attn_out take an optional `window` (a sliding-window layer, as the TEE's family declares it):
each tile then scores and reads only the keys and values inside its rows' windows (protocol.query_tiles).
    o_proj    attention's output (T, q_dim) -> o_proj, when the TEE attends over its own cache (qkv's values)
    gate_up   x -> [gate | up]; the TEE runs SiLU(gate) * up
    down      -> down_proj

The linears (qkv, attn_out's o_proj, gate_up, down, lm_head) stack the rows of every call into one product;
scores and the embedding run one call at a time (no weight to share).
"""

from __future__ import annotations

import math

import torch

from tsqp.errors import ProtocolError, TsqpError
from tsqp.server.calls import Call, int_arg, parts, split, stacked
from tsqp.server.kernels import linear
from tsqp.server.sessions import Session
from tsqp.server.sharded import assemble_tiles
from tsqp.server.weights import VALUE_DTYPE
from tsqp.tuning import SMALL_STEP_ROWS, one_thread
from tsqp.wire.protocol import MAX_QUERY_TILE, query_tiles


class LayerCalls:
    """Plain mode's calls of the Engine (a mixin: it uses the engine's config, weights, budget and helpers)."""

    def op_embedding(self, args, ids) -> Call:
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ProtocolError("embedding takes a 1-d int64 tensor of token ids")
        self._check_tokens(ids.shape[0])
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise TsqpError(f"token id out of range [0, {self.config.vocab_size})")
        self.budget.reserve_rows(ids.shape[0], self.config.hidden_size, self.dtype, "embedding")
        return Call("embedding", {}, (ids,))

    def step_embedding(self, calls):
        ((ids,),) = (call.inputs for call in calls)  # one call: no weight to share
        shape, out = (ids.shape[0], self.config.hidden_size), self.linears.out
        if self.ranks.world == 1:
            return [[torch.index_select(self.embed, 0, ids, out=out(shape))]]
        vocab = self.shard.vocab
        local = ids - vocab.start
        held = (local >= 0) & (local < len(vocab))
        rows = out(shape) if self.ranks.leader else torch.empty(shape, dtype=self.dtype, device=self.device)
        torch.index_select(self.embed, 0, local.clamp(0, len(vocab) - 1), out=rows)
        rows.masked_fill_(~held[:, None], 0)  # each id's row is held by one rank: the sum is exact
        self.ranks.reduce(rows)
        return [[rows]]

    def op_lm_head(self, args, x) -> Call:
        x = self._activation(x, self.config.hidden_size)
        self.budget.reserve_rows(x.shape[0], self.config.vocab_size, self.dtype, "lm_head", x)
        return Call("lm_head", {}, (x,))

    def step_lm_head(self, calls):
        return split(self.linears.columns(stacked(calls), self.head, None, "vocab"), calls)

    # -- each layer's calls ----------------------------------------------------------------

    def op_qkv(self, session: Session, args, x) -> Call:
        """x (T, hidden) -> [q | k] (T, q_dim + kv_dim) to the TEE for RoPE; v is cached at [pos, pos+T).

        args.values (optional, a bool): v (T, kv_dim) in the server dtype as a second result, for a TEE that
        attends over its own cache (the server caches it all the same: a later call may score with it)."""
        return self._qkv(session, args, self._activation(x, self.config.hidden_size))

    def _qkv(self, session: Session, args, x) -> Call:
        """qkv's books for x (T, hidden): its position, room and working memory (a fused down_qkv's too)."""
        layer, pos = self._layer_pos(session, args)
        values = args.get("values", False)
        if not isinstance(values, bool):
            raise ProtocolError(f"argument 'values' must be true or false, got {values!r}")
        self._check_room(session, pos, x.shape[0])
        c = self.config
        # q and k (and v returned) in the server dtype; v, and x cast for it, in float32
        self.budget.reserve_rows(x.shape[0], c.q_dim + c.kv_dim + values * c.kv_dim, self.dtype, "qkv", x)
        self.budget.reserve_rows(x.shape[0], c.kv_dim + c.hidden_size, VALUE_DTYPE, "qkv")
        if values:  # the TEE keeps the keys and attends: no scores call will mark these positions cached
            session.filled[layer] = pos + x.shape[0]
        return Call("qkv", {"session": session.id, "layer": layer, "pos": pos, "values": values}, (x,))

    def step_qkv(self, calls):
        c, kv = self.config, len(self.shard.kv_heads)
        x, weights = stacked(calls), self.layers[calls[0].args["layer"]]
        v = linear(x.to(VALUE_DTYPE), weights.v, weights.v_bias)  # (rows of every call, this rank's kv_dim)
        for call, values in zip(calls, parts(v, calls), strict=True):  # each session's cached at its positions
            session, layer, pos = self._where(call.args)
            T = values.shape[0]
            session.values[layer, :, pos : pos + T] = values.view(T, kv, c.head_dim).transpose(0, 1)
        qk = split(self.linears.columns(x, weights.qk, weights.qk_bias, "qk"), calls)
        wanted = [call.args.get("values", False) for call in calls]
        if not any(wanted):
            return qk
        returned = split(self.linears.assemble(v.to(self.dtype), "kv"), calls)  # after qk: its arena slot is next
        return [q + v if want else q for q, v, want in zip(qk, returned, wanted, strict=True)]

    def op_scores(self, session: Session, args, q, k) -> Call:
        """q (T, heads, hd), k (T, kv_heads, hd) post-RoPE -> scores q k^T / sqrt(hd), packed by query tiles.

        k is cached at [pos, pos+T). Each tile scores its rows against the keys up to its last row, from
        its first row's window on (args.window, when given); the TEE masks the rest and runs the softmax.
        """
        c = self.config
        layer, pos = self._layer_pos(session, args)
        tile, window = int_arg(args, "tile", 1, MAX_QUERY_TILE), self._window(args)
        T = q.shape[0] if q.dim() == 3 else -1
        if tuple(q.shape) != (T, c.num_heads, c.head_dim) or tuple(k.shape) != (T, c.num_kv_heads, c.head_dim):
            raise ProtocolError(
                f"scores needs q (T, {c.num_heads}, {c.head_dim}) and k (T, {c.num_kv_heads}, {c.head_dim})"
            )
        self._check_room(session, pos, T)
        self._float(q)  # both dtypes checked before the cache changes
        self._float(k)
        _, total = query_tiles(T, pos, c.num_heads, tile, window)
        self.budget.reserve((total + q.numel()) * self.dtype.itemsize, f"scores of {T} tokens after {pos}")
        session.filled[layer] = pos + T
        args = {"session": session.id, "layer": layer, "pos": pos, "tile": tile, "window": window}
        return Call("scores", args, (q, k))

    def step_scores(self, calls):
        (call,), c, s = calls, self.config, self.shard  # one call: per-session work only
        (session, layer, pos), (q, k) = self._where(call.args), call.inputs
        T, heads, kv = q.shape[0], s.heads, s.kv_heads
        group = len(heads) // len(kv)  # this rank's query heads per kv head
        session.keys[layer, :, pos : pos + T] = k[:, kv.start : kv.stop].transpose(0, 1)
        keys_t = session.keys[layer, :, : pos + T].transpose(1, 2)  # (kv, hd, L)
        q = q[:, heads.start : heads.stop].reshape(T, len(kv), group, c.head_dim).permute(1, 2, 0, 3)  # (kv, g, T, hd)
        tile, window = call.args["tile"], call.args["window"]
        tiles, total = query_tiles(T, pos, len(heads), tile, window)
        single = self.ranks.world == 1
        packed = self.linears.out((total,)) if single else torch.empty(total, dtype=self.dtype, device=self.device)
        with one_thread(T <= SMALL_STEP_ROWS):  # see attend
            for t in tiles:
                q_tile = q[:, :, t.row : t.row + t.rows].reshape(len(kv), group * t.rows, c.head_dim)
                out = packed[t.offset : t.offset + len(heads) * t.rows * t.keys].view(len(kv), group * t.rows, t.keys)
                torch.bmm(q_tile, keys_t[:, :, t.first : t.end], out=out)
        packed.mul_(1.0 / math.sqrt(c.head_dim))
        if single:
            return [[packed]]
        parts = self.ranks.gather(packed)
        if parts is None:
            return [[None]]
        tiles, total = query_tiles(T, pos, c.num_heads, tile, window)
        return [[assemble_tiles(self.linears.out((total,)), parts, tiles, [r.heads for r in self.shards])]]

    def op_attn_out(self, session: Session, args, probs) -> Call:
        """probs packed like scores -> o_proj(probs @ V) (T, hidden); V is the session's cache.

        T: args.tokens, the queries from pos on (scores of later queries may be cached already, a
        pipelined client's next chunks); by default every cached position from pos on.
        """
        c = self.config
        layer, pos = self._layer_pos(session, args)
        tile, window = int_arg(args, "tile", 1, MAX_QUERY_TILE), self._window(args)
        cached = session.filled[layer] - pos
        T = int_arg(args, "tokens", 1, max(cached, 1)) if "tokens" in args else cached
        _, total = query_tiles(T, pos, c.num_heads, tile, window)
        if not 0 < T <= cached or tuple(probs.shape) != (total,):
            raise ProtocolError(f"attn_out needs {total} packed probabilities after scores at pos {pos}")
        self._float(probs)
        # probs in float32, P V and its transpose, the result and its float32 partial sums
        values = (total + 2 * T * c.q_dim + T * c.hidden_size) * VALUE_DTYPE.itemsize
        self.budget.reserve(values + T * c.hidden_size * self.dtype.itemsize, f"attention of {T} tokens after {pos}")
        args = {"session": session.id, "layer": layer, "pos": pos, "tile": tile, "tokens": T, "window": window}
        return Call("attn_out", args, (probs,))

    def step_attn_out(self, calls):
        weights, tokens = self.layers[calls[0].args["layer"]], [call.args["tokens"] for call in calls]
        attended = [self.attend(call.args, call.inputs[0]) for call in calls]  # per session: P V
        x = attended[0] if len(calls) == 1 else torch.cat(attended)
        return split(self.linears.rows(x, weights.o, weights.o_bias, self.config.hidden_size), calls, tokens)

    def attend(self, args, probs) -> torch.Tensor:
        """probs @ V on this rank's heads -> (T, heads * hd) float32, head-major like q_proj: o_proj's input.

        A decode step's attention products (scores too) run on one thread: a batched GEMM this small is
        several times faster on one, and a second thread may wait for a core the TEE processes hold."""
        c, s, (session, layer, pos) = self.config, self.shard, self._where(args)
        T, heads, kv = args["tokens"], s.heads, s.kv_heads
        group = len(heads) // len(kv)
        tiles, _ = query_tiles(T, pos, c.num_heads, args["tile"], args["window"])
        probs = probs.to(VALUE_DTYPE)
        values = session.values[layer]  # (kv, capacity, hd): this rank's kv heads
        out = torch.empty(len(kv), group, T, c.head_dim, dtype=VALUE_DTYPE, device=self.device)
        with one_thread(T <= SMALL_STEP_ROWS):
            for t in tiles:
                block = t.rows * t.keys  # a tile is (heads, rows, keys): this rank's heads are one run of it
                p = probs[t.offset + heads.start * block : t.offset + heads.stop * block]
                o = torch.bmm(
                    p.view(len(kv), group * t.rows, t.keys), values[:, t.first : t.end]
                )  # (kv, group*rows, hd)
                out[:, :, t.row : t.row + t.rows] = o.view(len(kv), group, t.rows, c.head_dim)
        return out.permute(2, 0, 1, 3).reshape(T, len(heads) * c.head_dim)

    def _window(self, args) -> int | None:
        """scores' and attn_out's optional sliding window: None (every earlier key) when not given."""
        if args.get("window") is None:
            return None
        return int_arg(args, "window", 1, self.config.max_position_embeddings)

    def op_o_proj(self, session: Session, args, x) -> Call:
        """x (T, q_dim), attention computed in the TEE -> o_proj(x) (T, hidden), on the value path like
        attn_out's (a float32 product, rounded to the server dtype once)."""
        c = self.config
        layer = int_arg(args, "layer", 0, c.num_layers - 1)
        x = self._activation(x, c.q_dim)
        self.budget.reserve_rows(x.shape[0], c.hidden_size, self.dtype, "o_proj", x)
        self.budget.reserve_rows(x.shape[0], c.q_dim + c.hidden_size, VALUE_DTYPE, "o_proj")
        return Call("o_proj", {"layer": layer}, (x,))

    def step_o_proj(self, calls):
        weights = self.layers[calls[0].args["layer"]]
        x = stacked(calls).to(VALUE_DTYPE)
        return split(self.linears.linear(x, weights.o, weights.o_bias, "o"), calls)

    def op_gate_up(self, session: Session, args, x) -> Call:
        layer = int_arg(args, "layer", 0, self.config.num_layers - 1)
        x = self._activation(x, self.config.hidden_size)
        self.budget.reserve_rows(x.shape[0], 2 * self.config.intermediate_size, self.dtype, "gate_up", x)
        return Call("gate_up", {"layer": layer}, (x,))

    def step_gate_up(self, calls):
        weights = self.layers[calls[0].args["layer"]]
        return split(self.linears.columns(stacked(calls), weights.gate_up, weights.gate_up_bias, "gate_up"), calls)

    def op_down(self, session: Session, args, x) -> Call:
        layer = int_arg(args, "layer", 0, self.config.num_layers - 1)
        x = self._activation(x, self.config.intermediate_size)
        self.budget.reserve_rows(x.shape[0], self.config.hidden_size, VALUE_DTYPE, "down", x)
        return Call("down", {"layer": layer}, (x,))

    def step_down(self, calls):
        weights = self.layers[calls[0].args["layer"]]
        return split(self.linears.linear(stacked(calls), weights.down, weights.down_bias, "down"), calls)
