"""The untrusted server's compute: the weights it holds, the per-session KV cache, and one method per call.

The engine knows nothing about sockets; `server.py` is a thin loop around `Engine.handle`, and tests
can call `handle` directly. Every input is validated against the model before it is used.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tsqp.errors import ProtocolError, TsqpError
from tsqp.model.checkpoint import Checkpoint, layer_prefix
from tsqp.model.config import LlamaConfig
from tsqp.wire.pad_seeds import SEED_BYTES, expand
from tsqp.wire.protocol import (
    CONTROL_METHODS,
    DTYPES,
    MASKED_DTYPE,
    MASKED_LINEARS,
    MAX_QUERY_TILE,
    METHODS,
    SESSION_METHODS,
    Message,
    query_tiles,
)

DEFAULT_MAX_CACHE_BYTES = 8 << 30
DEFAULT_IDLE_TIMEOUT_S = 600.0
EVICT_IDLE_S = 30.0  # when the cache is full, sessions idle this long give way to a new one (a killed client's)
MAX_BATCH = 8
PRIVATE_ONLY_METHODS = ("init", "ping", "attach_arena", "echo", "masked_linear", "pad")  # no sessions: no KV cache

Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]

# The value path (v_proj, the V cache, P @ V, o_proj) runs in float32 whatever the server dtype: the
# TEE never sees V or P @ V, so their rounding is what verification must tolerate in attn_out; in
# bfloat16 that bound was loose enough to let a single-element lie through. It costs one float32
# copy of v_proj and o_proj, and a float32 V cache.
VALUE_DTYPE = torch.float32


def _value_path(weight: torch.Tensor | None) -> torch.Tensor | None:
    return None if weight is None else weight.to(VALUE_DTYPE)


@dataclass
class Layer:
    qk: torch.Tensor  # (q_dim + kv_dim, hidden): q and k projections fused, their result goes to the TEE
    qk_bias: torch.Tensor | None
    v: torch.Tensor  # (kv_dim, hidden), float32: its result stays in the KV cache
    v_bias: torch.Tensor | None
    o: torch.Tensor  # (hidden, q_dim), float32
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # (2 intermediate, hidden)
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # (hidden, intermediate)
    down_bias: torch.Tensor | None


@dataclass
class Session:
    owner: bytes  # the client connection that opened it; nobody else can use it
    keys: torch.Tensor  # (layers, kv_heads, capacity, head_dim), post-RoPE, as sent by the TEE
    values: torch.Tensor  # (layers, kv_heads, capacity, head_dim), never leave the server
    filled: list[int] = field(default_factory=list)  # per layer: positions holding keys and values
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class Engine:
    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        progress=None,
        private_only: bool = False,
    ):
        """private_only: keep only private mode's float64 weights (made layer by layer once loaded, each
        layer's others dropped as its float64 ones exist): plain-mode calls are refused. A private client's
        own server runs so; it halves the memory of a server that holds both (1.1B: 8.8 GB, not 13.2)."""
        self.checkpoint = Checkpoint(model_dir)
        self.config: LlamaConfig = self.checkpoint.config
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.max_cache_bytes = max_cache_bytes
        self.idle_timeout_s = idle_timeout_s
        self.sessions: dict[bytes, Session] = {}
        self.fingerprint = self.checkpoint.fingerprint()
        self._alloc: Alloc | None = None
        self._masked: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = {}  # float64 copies
        self.private_only = private_only
        self.instance = secrets.token_hex(8)
        self._load(progress)
        if private_only:
            for layer in range(self.config.num_layers):
                for op in MASKED_LINEARS[:-1]:
                    self._masked_weight(op, layer)
                self.layers[layer] = None  # its float32 weights are freed as soon as its float64 ones exist
            self._masked_weight("lm_head", 0)
            self.embed = self.head = None

    # -- loading -------------------------------------------------------------------------------

    def _load(self, progress) -> None:
        c = self.config
        names = ["model.embed_tokens.weight"] + ([] if c.tie_word_embeddings else ["lm_head.weight"])
        if c.tie_word_embeddings and self.checkpoint.has("lm_head.weight"):
            names.append("lm_head.weight")
        projections = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
        for layer in range(c.num_layers):
            for part, bias in (("self_attn", c.attention_bias), ("mlp", c.mlp_bias)):
                for proj in projections["attn" if part == "self_attn" else "mlp"]:
                    names.append(f"{layer_prefix(layer)}{part}.{proj}.weight")
                    if bias:
                        names.append(f"{layer_prefix(layer)}{part}.{proj}.bias")
        weights: dict[str, torch.Tensor] = {}
        for name, tensor in self.checkpoint.tensors(names):
            weights[name] = tensor.to(self.device, self.dtype)
            if progress:
                progress(len(weights), len(names))
        self.embed = weights.pop("model.embed_tokens.weight")
        self.head = weights.pop("lm_head.weight", self.embed)
        self.layers = [self._fuse(weights, layer) for layer in range(c.num_layers)]

    def _fuse(self, w: dict[str, torch.Tensor], layer: int) -> Layer:
        p = layer_prefix(layer)

        def cat(part: str, projs: list[str], kind: str) -> torch.Tensor | None:
            keys = [f"{p}{part}.{proj}.{kind}" for proj in projs]
            if kind == "bias" and keys[0] not in w:
                return None
            return torch.cat([w.pop(k) for k in keys])

        return Layer(
            qk=cat("self_attn", ["q_proj", "k_proj"], "weight"),
            qk_bias=cat("self_attn", ["q_proj", "k_proj"], "bias"),
            v=_value_path(w.pop(f"{p}self_attn.v_proj.weight")),
            v_bias=_value_path(w.pop(f"{p}self_attn.v_proj.bias", None)),
            o=_value_path(w.pop(f"{p}self_attn.o_proj.weight")),
            o_bias=_value_path(w.pop(f"{p}self_attn.o_proj.bias", None)),
            gate_up=cat("mlp", ["gate_proj", "up_proj"], "weight"),
            gate_up_bias=cat("mlp", ["gate_proj", "up_proj"], "bias"),
            down=w.pop(f"{p}mlp.down_proj.weight"),
            down_bias=w.pop(f"{p}mlp.down_proj.bias", None),
        )

    # -- dispatch ------------------------------------------------------------------------------

    def handle(self, peer: bytes, request: Message, alloc: Alloc | None = None) -> tuple[dict, list[torch.Tensor]]:
        """Runs one validated request; returns (reply args, result tensors on the CPU).

        alloc(shape, dtype) gives the buffer a result is written to (a slot in the client's
        shared-memory arena); results land there directly on a CPU server.
        """
        method = request.header.get("method")
        if not isinstance(method, str) or method not in METHODS or not hasattr(self, "op_" + method):
            raise ProtocolError(f"unknown method {method!r}")
        if len(request.tensors) != METHODS[method]:
            raise ProtocolError(f"{method} takes {METHODS[method]} tensors, got {len(request.tensors)}")
        if self.private_only and method not in PRIVATE_ONLY_METHODS:
            raise TsqpError(f"this server runs with --private-only: {method} is a plain-mode call; use --private")
        self.expire_idle()
        inputs = [t.to(self.device) for t in request.tensors]
        args = request.args
        start = time.perf_counter()
        handler = getattr(self, "op_" + method)
        self._alloc = alloc if alloc is not None and self.device.type == "cpu" else None
        if method in CONTROL_METHODS:
            reply_args, tensors = handler(peer, request.header.get("session"), args)
        elif method in SESSION_METHODS:
            reply_args, tensors = {}, handler(self._session(peer, request.header.get("session")), args, *inputs)
        else:
            reply_args, tensors = {}, handler(args, *inputs)
        if alloc is None:
            tensors = [t.to("cpu") for t in tensors]  # with an arena the server copies into it directly
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: time them, not their launch
        return {**reply_args, "compute_start": start, "compute_s": time.perf_counter() - start}, tensors

    def _session(self, peer: bytes, session_id) -> Session:
        session = self.sessions.get(session_id) if isinstance(session_id, bytes) else None
        if session is None or not secrets.compare_digest(session.owner, peer):
            raise TsqpError("unknown or expired session (sessions are bound to the connection that opened them)")
        session.last_used = time.monotonic()
        return session

    def expire_idle(self) -> None:
        now = time.monotonic()
        for sid in [s for s, sess in self.sessions.items() if now - sess.last_used > self.idle_timeout_s]:
            del self.sessions[sid]

    def _make_room(self, nbytes: int) -> None:
        """Frees sessions idle for EVICT_IDLE_S or more, least recently used first, until nbytes fit.

        ZeroMQ does not tell the server which client went away, so a client killed with -9 leaves its
        sessions behind until the idle timeout; under memory pressure they give way sooner.
        """
        now = time.monotonic()
        idle = sorted((s.last_used, sid) for sid, s in self.sessions.items() if now - s.last_used >= EVICT_IDLE_S)
        for _, sid in idle:
            if sum(s.nbytes for s in self.sessions.values()) + nbytes <= self.max_cache_bytes:
                return
            del self.sessions[sid]

    # -- control -------------------------------------------------------------------------------

    def op_ping(self, peer, session_id, args):
        return {}, []

    def op_echo(self, args, x):
        """Returns its input: `tsqp diagnose` measures round-trip latency and transfer bandwidth with it."""
        return [self._out(tuple(x.shape), x.dtype).copy_(x)]

    def op_init(self, peer, session_id, args):
        c = self.config
        if args.get("private") is True:  # the float64 weights of private mode, made now rather than mid-prefill
            for op, layer in self._masked_ops():
                self._masked_weight(op, layer)
        info = {
            "fingerprint": self.fingerprint,
            "instance": self.instance,  # tells two servers apart (a private client's helper must be another)
            "dtype": self.dtype_name,
            "device": str(self.device),
            "layers": c.num_layers,
            "hidden": c.hidden_size,
            "vocab": c.vocab_size,
        }
        return info, []

    def op_open_session(self, peer, session_id, args):
        c = self.config
        capacity = _int_arg(args, "capacity", 1, c.max_position_embeddings)
        nbytes = c.num_layers * c.kv_dim * capacity * (self.dtype.itemsize + VALUE_DTYPE.itemsize)
        self._make_room(nbytes)
        in_use = sum(s.nbytes for s in self.sessions.values())
        if in_use + nbytes > self.max_cache_bytes:
            raise TsqpError(
                f"KV cache memory cap reached: a {capacity}-token session needs {nbytes / 2**20:.1f} MiB, "
                f"{in_use / 2**20:.1f} of {self.max_cache_bytes / 2**20:.1f} MiB are in use"
            )
        shape = (c.num_layers, c.num_kv_heads, capacity, c.head_dim)
        # zeroed: a cache slot read before it is written (attn_out before qkv) must not hold an earlier
        # session's values, which may belong to another client
        session = Session(
            owner=peer,
            keys=torch.zeros(shape, dtype=self.dtype, device=self.device),
            values=torch.zeros(shape, dtype=VALUE_DTYPE, device=self.device),
            filled=[0] * c.num_layers,
        )
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = session
        return {"session": session_id}, []

    def op_close_session(self, peer, session_id, args):
        self._session(peer, session_id)
        del self.sessions[session_id]
        return {}, []

    # -- the seed's calls ----------------------------------------------------------------------

    def op_embedding(self, args, ids):
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ProtocolError("embedding takes a 1-d int64 tensor of token ids")
        self._check_tokens(ids.shape[0])
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise TsqpError(f"token id out of range [0, {self.config.vocab_size})")
        return [torch.index_select(self.embed, 0, ids, out=self._out((ids.shape[0], self.config.hidden_size)))]

    def op_lm_head(self, args, x):
        return [self._linear(self._activation(x, self.config.hidden_size), self.head, None)]

    def op_linear(self, args, x):
        weight, bias = self._named_weight(args, args.get("name"))
        return [self._linear(self._activation(x, weight.shape[1]), weight, bias)]

    def op_batch_linear(self, args, x):
        names = args.get("names")
        if not isinstance(names, list) or not 0 < len(names) <= MAX_BATCH:
            raise ProtocolError(f"batch_linear needs a list of 1 to {MAX_BATCH} weight names")
        return [self.op_linear({**args, "name": name}, x)[0] for name in names]

    def op_matmul(self, args, a, b):
        if a.dim() != b.dim() or a.dim() not in (2, 3) or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
            raise ProtocolError(f"matmul shapes {list(a.shape)} and {list(b.shape)} do not match")
        shape = (*a.shape[:-1], b.shape[-1])
        limit = self.config.num_heads * self.config.max_position_embeddings**2  # all heads' full score square
        if math.prod(shape) > limit:
            raise ProtocolError(f"matmul result {list(shape)} exceeds {limit} elements")
        return [torch.matmul(self._float(a), self._float(b), out=self._out(shape))]

    def _named_weight(self, args, name) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The seed's names (q_proj ... down_proj, with args layer=N), as views of the fused weights."""
        c = self.config
        w = self.layers[_int_arg(args, "layer", 0, c.num_layers - 1)]
        fused = {
            "q_proj": (w.qk, w.qk_bias, 0, c.q_dim),
            "k_proj": (w.qk, w.qk_bias, c.q_dim, c.kv_dim),
            "v_proj": (w.v, w.v_bias, 0, c.kv_dim),
            "gate_proj": (w.gate_up, w.gate_up_bias, 0, c.intermediate_size),
            "up_proj": (w.gate_up, w.gate_up_bias, c.intermediate_size, c.intermediate_size),
            "o_proj": (w.o, w.o_bias, 0, c.hidden_size),
            "down_proj": (w.down, w.down_bias, 0, c.hidden_size),
        }
        if not isinstance(name, str) or name not in fused:
            raise ProtocolError(f"unknown weight {name!r}: one of {', '.join(fused)}")
        weight, bias, start, rows = fused[name]
        weight, bias = weight.narrow(0, start, rows), None if bias is None else bias.narrow(0, start, rows)
        return weight.to(self.dtype), None if bias is None else bias.to(self.dtype)  # v, o are kept in float32

    # -- fused per-layer calls -----------------------------------------------------------------

    def op_qkv(self, session: Session, args, x):
        """x (T, hidden) -> [q | k] (T, q_dim + kv_dim) to the TEE for RoPE; v is cached at [pos, pos+T)."""
        c = self.config
        layer, pos = self._layer_pos(session, args)
        x = self._activation(x, c.hidden_size)
        T = x.shape[0]
        self._check_room(session, pos, T)
        weights = self.layers[layer]
        v = F.linear(x.to(VALUE_DTYPE), weights.v, weights.v_bias)  # (T, kv_dim)
        session.values[layer, :, pos : pos + T] = v.view(T, c.num_kv_heads, c.head_dim).transpose(0, 1)
        return [self._linear(x, weights.qk, weights.qk_bias)]

    def op_scores(self, session: Session, args, q, k):
        """q (T, heads, hd), k (T, kv_heads, hd) post-RoPE -> scores q k^T / sqrt(hd), packed by query tiles.

        k is cached at [pos, pos+T). Each tile scores its rows against the keys up to its last row; the
        TEE masks the diagonal block and runs the softmax.
        """
        c = self.config
        layer, pos = self._layer_pos(session, args)
        tile = _int_arg(args, "tile", 1, MAX_QUERY_TILE)
        T = q.shape[0] if q.dim() == 3 else -1
        if tuple(q.shape) != (T, c.num_heads, c.head_dim) or tuple(k.shape) != (T, c.num_kv_heads, c.head_dim):
            raise ProtocolError(
                f"scores needs q (T, {c.num_heads}, {c.head_dim}) and k (T, {c.num_kv_heads}, {c.head_dim})"
            )
        self._check_room(session, pos, T)
        self._float(q)  # both dtypes checked before the cache changes
        session.keys[layer, :, pos : pos + T] = self._float(k).transpose(0, 1)
        session.filled[layer] = pos + T
        keys_t = session.keys[layer, :, : pos + T].transpose(1, 2)  # (kv, hd, L)
        q = self._float(q).view(T, c.num_kv_heads, c.group_size, c.head_dim).permute(1, 2, 0, 3)  # (kv, group, T, hd)
        tiles, total = query_tiles(T, pos, c.num_heads, tile)
        packed = self._out((total,))
        for t in tiles:
            q_tile = q[:, :, t.row : t.row + t.rows].reshape(c.num_kv_heads, c.group_size * t.rows, c.head_dim)
            out = packed[t.offset : t.offset + c.num_heads * t.rows * t.keys].view(
                c.num_kv_heads, c.group_size * t.rows, t.keys
            )
            torch.bmm(q_tile, keys_t[:, :, : t.keys], out=out)
        packed.mul_(1.0 / math.sqrt(c.head_dim))
        return [packed]

    def op_attn_out(self, session: Session, args, probs):
        """probs packed like scores -> o_proj(probs @ V) (T, hidden); V is the session's cache.

        T: args.tokens, the queries from pos on (scores of later queries may be cached already, a
        pipelined client's next chunks); by default every cached position from pos on.
        """
        c = self.config
        layer, pos = self._layer_pos(session, args)
        tile = _int_arg(args, "tile", 1, MAX_QUERY_TILE)
        cached = session.filled[layer] - pos
        T = _int_arg(args, "tokens", 1, max(cached, 1)) if "tokens" in args else cached
        tiles, total = query_tiles(T, pos, c.num_heads, tile)
        if not 0 < T <= cached or tuple(probs.shape) != (total,):
            raise ProtocolError(f"attn_out needs {total} packed probabilities after scores at pos {pos}")
        probs = self._float(probs).to(VALUE_DTYPE)
        values = session.values[layer]  # (kv, capacity, hd)
        out = torch.empty(c.num_kv_heads, c.group_size, T, c.head_dim, dtype=VALUE_DTYPE, device=self.device)
        for t in tiles:
            p = probs[t.offset : t.offset + c.num_heads * t.rows * t.keys].view(
                c.num_kv_heads, c.group_size * t.rows, t.keys
            )
            o = torch.bmm(p, values[:, : t.keys])  # (kv, group*rows, hd)
            out[:, :, t.row : t.row + t.rows] = o.view(c.num_kv_heads, c.group_size, t.rows, c.head_dim)
        out = out.permute(2, 0, 1, 3).reshape(T, c.q_dim)  # (T, heads*hd), head-major like q_proj
        weights = self.layers[layer]
        if self.dtype == VALUE_DTYPE:
            return [self._linear(out, weights.o, weights.o_bias)]
        return [self._out((T, c.hidden_size)).copy_(F.linear(out, weights.o, weights.o_bias))]

    def op_gate_up(self, session: Session, args, x):
        layer = _int_arg(args, "layer", 0, self.config.num_layers - 1)
        weights = self.layers[layer]
        return [self._linear(self._activation(x, self.config.hidden_size), weights.gate_up, weights.gate_up_bias)]

    def op_down(self, session: Session, args, x):
        layer = _int_arg(args, "layer", 0, self.config.num_layers - 1)
        weights = self.layers[layer]
        return [self._linear(self._activation(x, self.config.intermediate_size), weights.down, weights.down_bias)]

    # -- private mode ------------------------------------------------------------------------

    def op_masked_linear(self, args, x):
        """x (T, in) float64, a masked activation x + r -> (x + r) W^T + b (T, out) in float64.

        Float64 because the pad is 2^k times larger than x: the product's rounding must stay far below x W^T
        (docs/threat-model.md, numerics). The server never sees x; it needs no session."""
        weight, bias = self._masked_weight(*self._masked_op(args))
        if x.dtype != MASKED_DTYPE:
            raise ProtocolError(f"masked_linear takes a float64 activation, not {x.dtype}")
        x = self._shape(x, weight.shape[1])
        out = self._out((x.shape[0], weight.shape[0]), MASKED_DTYPE)
        if bias is None:
            return [torch.matmul(x, weight.t(), out=out)]
        return [torch.addmm(bias, x, weight.t(), out=out)]

    def op_pad(self, args):
        """A helper server's call: z W^T (rows, out) float64 for the pad z = pad_seeds.expand(seed, rows, in).

        The TEE sends the seed (over CurveZMQ) to this server, which must not be the one that computes on
        x + z s: two servers that do not collude (docs/threat-model.md)."""
        weight, _ = self._masked_weight(*self._masked_op(args))
        seed = args.get("seed")
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ProtocolError(f"pad needs a {SEED_BYTES}-byte seed")
        rows = _int_arg(args, "rows", 1, self.config.max_position_embeddings)
        pad = expand(seed, rows, weight.shape[1]).to(self.device)  # the TEE's r, before its scale
        return [torch.matmul(pad, weight.t(), out=self._out((rows, weight.shape[0]), MASKED_DTYPE))]

    def _masked_ops(self) -> list[tuple[str, int]]:
        layers = [(op, layer) for layer in range(self.config.num_layers) for op in MASKED_LINEARS[:-1]]
        return layers + [("lm_head", 0)]

    def _masked_op(self, args) -> tuple[str, int]:
        op = args.get("op")
        if not isinstance(op, str) or op not in MASKED_LINEARS:
            raise ProtocolError(f"unknown masked linear {op!r}: one of {', '.join(MASKED_LINEARS)}")
        return op, 0 if op == "lm_head" else _int_arg(args, "layer", 0, self.config.num_layers - 1)

    def _masked_weight(self, op: str, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias of a private-mode linear as the server holds them, upcast once to float64."""
        key = (op, layer)
        if key not in self._masked:
            if op == "lm_head":
                parts = [(self.head, None)]
            else:
                w = self.layers[layer]
                parts = {
                    "qkv": [(w.qk, w.qk_bias), (w.v, w.v_bias)],
                    "o_proj": [(w.o, w.o_bias)],
                    "gate_up": [(w.gate_up, w.gate_up_bias)],
                    "down": [(w.down, w.down_bias)],
                }[op]
            # the value path is kept in float32; in private mode v and o are rounded like every weight
            weight = torch.cat([p.to(self.dtype).to(MASKED_DTYPE) for p, _ in parts])
            biases = [b for _, b in parts if b is not None]
            bias = torch.cat([b.to(self.dtype).to(MASKED_DTYPE) for b in biases]) if biases else None
            self._masked[key] = (weight, bias)
        return self._masked[key]

    # -- outputs -------------------------------------------------------------------------------

    def _out(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Where a result goes: the request's arena slot on a CPU server, else fresh device memory."""
        if self._alloc is not None:
            return self._alloc(shape, dtype or self.dtype)
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T + b, written straight into its output buffer."""
        out = self._out((x.shape[0], weight.shape[0]))
        if bias is None:
            return torch.matmul(x, weight.t(), out=out)
        return torch.addmm(bias, x, weight.t(), out=out)

    # -- validation helpers --------------------------------------------------------------------

    def _layer_pos(self, session: Session, args) -> tuple[int, int]:
        layer = _int_arg(args, "layer", 0, self.config.num_layers - 1)
        pos = _int_arg(args, "pos", 0, session.keys.shape[2])
        if pos > session.filled[layer]:
            raise ProtocolError(f"pos {pos} skips past the {session.filled[layer]} cached positions of layer {layer}")
        return layer, pos

    def _check_room(self, session: Session, pos: int, T: int) -> None:
        if T <= 0 or pos + T > session.keys.shape[2]:
            raise TsqpError(f"{T} tokens at position {pos} exceed the session capacity of {session.keys.shape[2]}")

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise ProtocolError(f"tensor of dtype {x.dtype} sent to a {self.dtype_name} server")
        return x

    def _activation(self, x: torch.Tensor, width: int) -> torch.Tensor:
        return self._float(self._shape(x, width))

    def _shape(self, x: torch.Tensor, width: int) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != width or x.shape[0] == 0:
            raise ProtocolError(f"expected a (T, {width}) activation, got {list(x.shape)}")
        self._check_tokens(x.shape[0])
        return x

    def _check_tokens(self, T: int) -> None:
        """No call concerns more tokens than the model has positions; this bounds every result's size
        (an lm_head reply is vocab/hidden times its request)."""
        if T > self.config.max_position_embeddings:
            raise ProtocolError(f"{T} tokens exceed the model's {self.config.max_position_embeddings} positions")


def _int_arg(args: dict, name: str, low: int, high: int) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"argument {name!r} must be an integer in [{low}, {high}], got {value!r}")
    return value
