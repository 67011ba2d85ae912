"""The untrusted server's compute: the weights it holds, the per-session KV cache, and one method per call.

The engine knows nothing about sockets; `loop.py` is a thin loop around `Engine.handle`, and tests can
call `handle` directly. Every input is validated against the model before it is used.

Each call is two methods. `op_NAME` (rank 0 only) validates the request and keeps the books: sessions,
their owners, how far each layer's cache is filled, the memory cap, idle expiry. It then runs a step,
`step_NAME`, with everything resolved (session id, layer, positions): the compute on this rank's share
of the weights and of the KV cache, and the collectives that assemble the result on rank 0. On a
tensor-parallel server (parallel.py) rank 0 sends the step to the other ranks first and each runs the
same step method; on a single server the share is the whole model and the collectives do nothing.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tsqp.errors import ProtocolError, TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.model.config import LlamaConfig
from tsqp.server import kernels
from tsqp.server.budget import Budget
from tsqp.server.kernel_plans import PlanStore
from tsqp.server.kernel_tuning import ranking, tune
from tsqp.server.kernels import linear, linear_into
from tsqp.server.parallel import RankFailure, Ranks, assemble_columns, assemble_tiles, shards
from tsqp.server.weights import VALUE_DTYPE, load_weights
from tsqp.tuning import SMALL_STEP_ROWS, one_thread
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

# How each linear is split over the ranks (parallel.Shard): by output columns (a kind of Shard.columns),
# gathered to rank 0, or by input rows ("o", "down": Shard.inputs), partial sums reduced to rank 0.
ROW_SPLITS = ("o", "down")
MASKED_SPLITS = {"qkv": "qkv", "o_proj": "o", "gate_up": "gate_up", "down": "down", "lm_head": "vocab"}
SEED_WEIGHTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj")

Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


@dataclass
class Session:
    owner: bytes  # the client connection that opened it; nobody else can use it (rank 0)
    keys: torch.Tensor  # (layers, kv_heads, capacity, head_dim), post-RoPE, as sent by the TEE (this rank's heads)
    values: torch.Tensor  # (layers, kv_heads, capacity, head_dim), never leave the server
    id: bytes = b""
    filled: list[int] = field(default_factory=list)  # per layer: positions holding keys and values (rank 0)
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
        ranks: Ranks | None = None,
        max_memory_bytes: int | None = None,
    ):
        """private_only: keep only private mode's float64 weights (made layer by layer once loaded, each
        layer's others dropped as its float64 ones exist): plain-mode calls are refused. A private client's
        own server runs so; it halves the memory of a server that holds both (1.1B: 8.8 GB, not 13.2).

        ranks: this process's place among the ranks of a tensor-parallel server (parallel.join); by
        default one rank holding the whole model. max_cache_bytes bounds each rank's share of the caches.

        max_memory_bytes: the memory budget every request is checked against (budget.py; default: a share of
        the host's memory)."""
        self.checkpoint = Checkpoint(model_dir)
        self.config: LlamaConfig = self.checkpoint.config
        self.ranks = ranks or Ranks()
        self.shards = shards(self.config, self.ranks.world)  # every rank's share: rank 0 assembles by them
        self.shard = self.shards[self.ranks.rank]
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.max_cache_bytes = max_cache_bytes
        self.idle_timeout_s = idle_timeout_s
        self.sessions: dict[bytes, Session] = {}
        self.fingerprint = self.checkpoint.fingerprint()
        self._alloc: Alloc | None = None
        self._record: Callable | None = None  # batching.record: steps handed to it, not run
        self.batched = 0  # requests that ran in a product shared with other clients' (batching.py)
        self.batch_sizes: Counter[int] = Counter()  # products of batchable ops by how many requests shared them
        self._masked: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = {}  # float64 copies
        self._masked_total = 0  # their bytes (the budget asks at every reservation)
        self.private_only = private_only
        self.instance = secrets.token_hex(8)
        self.embed, self.head, self.layers = load_weights(
            self.checkpoint, self.shard, self.device, self.dtype, progress
        )
        if private_only:
            for layer in range(self.config.num_layers):
                for op in MASKED_LINEARS[:-1]:
                    self._masked_weight(op, layer)
                self.layers[layer] = None  # its float32 weights are freed as soon as its float64 ones exist
            self._masked_weight("lm_head", 0)
            self.embed = self.head = None
        started = time.perf_counter()
        # which linear kernel wins here, by shape and rows: measured once per host, then kept (kernel_plans.py)
        self.kernel_store = PlanStore.default(kernels.choice()) if self.device.type == "cpu" else None
        self.kernel_timings = tune(self._linear_weights(), store=self.kernel_store) if self.kernel_store else {}
        self.tuning_s = time.perf_counter() - started
        self.budget = Budget(max_memory_bytes)
        self.budget.count("kv_cache", lambda: sum(session.nbytes for session in self.sessions.values()))
        self.budget.count("float64_weights", lambda: self._masked_total)
        self.budget.settle()

    def _linear_weights(self) -> list[torch.Tensor]:
        """The float32 weights of plain mode's products, largest first (the LM head, then each layer's)."""
        layers = [layer for layer in self.layers if layer is not None]
        names = ("qk", "v", "o", "gate_up", "down")
        return [t for t in [self.head, *(getattr(layer, n) for n in names for layer in layers)] if t is not None]

    # -- dispatch ------------------------------------------------------------------------------

    def handle(self, peer: bytes, request: Message, alloc: Alloc | None = None) -> tuple[dict, list[torch.Tensor]]:
        """Runs one validated request; returns (reply args, result tensors on the CPU).

        alloc(shape, dtype) gives the buffer a result is written to (a slot in the client's
        shared-memory arena); results land there directly on a CPU server.
        """
        method = self.check_method(request)
        self.tick()
        inputs = [t.to(self.device) for t in request.tensors]
        args = request.args
        start = time.perf_counter()
        handler = getattr(self, "op_" + method)
        self._alloc = alloc if alloc is not None and self.device.type == "cpu" else None
        try:
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
        finally:
            self.budget.release()
        return {**reply_args, "compute_start": start, "compute_s": time.perf_counter() - start}, tensors

    def check_method(self, request: Message) -> str:
        """The request's method, if this server serves it with that many tensors."""
        method = request.header.get("method")
        if not isinstance(method, str) or method not in METHODS or not hasattr(self, "op_" + method):
            raise ProtocolError(f"unknown method {method!r}")
        if len(request.tensors) != METHODS[method]:
            raise ProtocolError(f"{method} takes {METHODS[method]} tensors, got {len(request.tensors)}")
        if self.private_only and method not in PRIVATE_ONLY_METHODS:
            raise TsqpError(f"this server runs with --private-only: {method} is a plain-mode call; use --private")
        return method

    def _run(self, step: str, args: dict, *tensors: torch.Tensor) -> list:
        """Rank 0: runs a step on every rank (the others get it first) and returns rank 0's results.
        While batching.record looks at a request, the step is handed to it instead of run."""
        if self._record is not None:
            self._record((step, args, tensors))
            return []
        self.ranks.send(step, args, tensors)
        try:
            return self.step(step, args, tensors)
        except Exception as exc:
            if self.ranks.world == 1 or isinstance(exc, RankFailure):
                raise
            # the other ranks wait in this step's collectives: they are out of step with rank 0 now
            raise RankFailure(f"rank 0 failed in {step}: {type(exc).__name__}: {exc}: the server stops") from None

    def step(self, step: str, args: dict, tensors) -> list:
        """Any rank: one step of a call, on this rank's share; the assembled results on rank 0."""
        return getattr(self, "step_" + step)(args, *tensors)

    def tick(self) -> None:
        """Between requests (and before each): frees idle sessions, keeps the followers' steps coming."""
        self.expire_idle()
        self.ranks.heartbeat()

    def _session(self, peer: bytes, session_id) -> Session:
        session = self.sessions.get(session_id) if isinstance(session_id, bytes) else None
        if session is None or not secrets.compare_digest(session.owner, peer):
            raise TsqpError("unknown or expired session (sessions are bound to the connection that opened them)")
        session.last_used = time.monotonic()
        return session

    def expire_idle(self) -> None:
        now = time.monotonic()
        for sid in [s for s, sess in self.sessions.items() if now - sess.last_used > self.idle_timeout_s]:
            self._run("close_session", {"session": sid})

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
            self._run("close_session", {"session": sid})

    # -- control -------------------------------------------------------------------------------

    def op_ping(self, peer, session_id, args):
        """Also what a load test watches: open sessions, their cache bytes, requests that shared a product, and
        the CPU seconds the server process has used (all its threads)."""
        cache = sum(session.nbytes for session in self.sessions.values())
        return {
            "sessions": len(self.sessions),
            "cache_bytes": cache,
            "batched": self.batched,
            "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())},
            "kernels": self.kernel_plan(),
            "memory": self.budget.report(),
            "cpu_s": time.process_time(),
        }, []

    def kernel_plan(self) -> dict[str, dict[str, str]]:
        """The fastest linear kernel measured at load, by weight shape and row count (kernel_tuning.py)."""
        return {
            shape: {str(rows): ranking(times)[0] for rows, times in figures.items()}
            for shape, figures in self.kernel_timings.items()
        }

    def op_echo(self, args, x):
        """Returns its input: `tsqp diagnose` measures round-trip latency and transfer bandwidth with it."""
        self.budget.reserve(x.nbytes, "echo")
        return [self._out(tuple(x.shape), x.dtype).copy_(x)]

    def op_init(self, peer, session_id, args):
        c = self.config
        if args.get("private") is True:  # the float64 weights of private mode, made now rather than mid-prefill
            missing = [key for key in self._masked_ops() if key not in self._masked]
            self.budget.reserve(sum(self._masked_bytes(*key) for key in missing), "private mode's float64 weights")
            self._run("masked_weights", {})
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

    def step_masked_weights(self, args):
        for op, layer in self._masked_ops():
            self._masked_weight(op, layer)
        return []

    def op_open_session(self, peer, session_id, args):
        c = self.config
        capacity = _int_arg(args, "capacity", 1, c.max_position_embeddings)
        kv_dim = len(self.shard.kv_heads) * c.head_dim  # this rank's share; every rank holds as much
        nbytes = c.num_layers * kv_dim * capacity * (self.dtype.itemsize + VALUE_DTYPE.itemsize)
        self._make_room(nbytes)
        in_use = sum(s.nbytes for s in self.sessions.values())
        if in_use + nbytes > self.max_cache_bytes:
            raise TsqpError(
                f"KV cache memory cap reached: a {capacity}-token session needs {nbytes / 2**20:.1f} MiB, "
                f"{in_use / 2**20:.1f} of {self.max_cache_bytes / 2**20:.1f} MiB are in use"
            )
        self.budget.reserve(nbytes, f"a {capacity}-token session's KV cache")
        session_id = secrets.token_bytes(16)
        self._run("open_session", {"session": session_id, "capacity": capacity})
        session = self.sessions[session_id]
        session.owner, session.filled = peer, [0] * c.num_layers
        return {"session": session_id}, []

    def step_open_session(self, args):
        c = self.config
        shape = (c.num_layers, len(self.shard.kv_heads), args["capacity"], c.head_dim)
        # zeroed: a cache slot read before it is written (attn_out before qkv) must not hold an earlier
        # session's values, which may belong to another client
        self.sessions[args["session"]] = Session(
            owner=b"",
            id=args["session"],
            keys=torch.zeros(shape, dtype=self.dtype, device=self.device),
            values=torch.zeros(shape, dtype=VALUE_DTYPE, device=self.device),
        )
        return []

    def op_close_session(self, peer, session_id, args):
        self._session(peer, session_id)
        self._run("close_session", {"session": session_id})
        return {}, []

    def step_close_session(self, args):
        self.sessions.pop(args["session"], None)
        return []

    # -- the seed's calls ----------------------------------------------------------------------

    def op_embedding(self, args, ids):
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ProtocolError("embedding takes a 1-d int64 tensor of token ids")
        self._check_tokens(ids.shape[0])
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise TsqpError(f"token id out of range [0, {self.config.vocab_size})")
        self._reserve_rows(ids.shape[0], self.config.hidden_size, self.dtype, "embedding")
        return self._run("embedding", {}, ids)

    def step_embedding(self, args, ids):
        shape = (ids.shape[0], self.config.hidden_size)
        if self.ranks.world == 1:
            return [torch.index_select(self.embed, 0, ids, out=self._out(shape))]
        vocab = self.shard.vocab
        local = ids - vocab.start
        held = (local >= 0) & (local < len(vocab))
        rows = self._out(shape) if self.ranks.leader else torch.empty(shape, dtype=self.dtype, device=self.device)
        torch.index_select(self.embed, 0, local.clamp(0, len(vocab) - 1), out=rows)
        rows.masked_fill_(~held[:, None], 0)  # each id's row is held by one rank: the sum is exact
        self.ranks.reduce(rows)
        return [rows]

    def op_lm_head(self, args, x):
        x = self._activation(x, self.config.hidden_size)
        self._reserve_rows(x.shape[0], self.config.vocab_size, self.dtype, "lm_head", x)
        return self._run("lm_head", {}, x)

    def step_lm_head(self, args, x):
        return [self._column_linear(x, self.head, None, "vocab")]

    def op_linear(self, args, x):
        c, name = self.config, args.get("name")
        layer = _int_arg(args, "layer", 0, c.num_layers - 1)
        if not isinstance(name, str) or name not in SEED_WEIGHTS:
            raise ProtocolError(f"unknown weight {name!r}: one of {', '.join(SEED_WEIGHTS)}")
        width = {"o_proj": c.q_dim, "down_proj": c.intermediate_size}.get(name, c.hidden_size)
        x = self._activation(x, width)
        mlp = c.intermediate_size
        out = {"q_proj": c.q_dim, "k_proj": c.kv_dim, "v_proj": c.kv_dim, "gate_proj": mlp, "up_proj": mlp}
        out_width = out.get(name, c.hidden_size)
        # the result, and the weight's rows cast to the server dtype
        self._reserve_rows(x.shape[0] + width, out_width, self.dtype, f"linear {name}", x)
        return self._run("linear", {"layer": layer, "name": name}, x)

    def step_linear(self, args, x):
        """The seed's names (q_proj ... down_proj, with args layer=N), as views of the fused weights."""
        c, s = self.config, self.shard
        w = self.layers[args["layer"]]
        q, kv, mlp = len(s.heads) * c.head_dim, len(s.kv_heads) * c.head_dim, len(s.mlp)
        weight, bias, start, rows, split = {
            "q_proj": (w.qk, w.qk_bias, 0, q, "q"),
            "k_proj": (w.qk, w.qk_bias, q, kv, "kv"),
            "v_proj": (w.v, w.v_bias, 0, kv, "kv"),
            "gate_proj": (w.gate_up, w.gate_up_bias, 0, mlp, "mlp"),
            "up_proj": (w.gate_up, w.gate_up_bias, mlp, mlp, "mlp"),
            "o_proj": (w.o, w.o_bias, 0, c.hidden_size, "o"),
            "down_proj": (w.down, w.down_bias, 0, c.hidden_size, "down"),
        }[args["name"]]
        weight, bias = weight.narrow(0, start, rows), None if bias is None else bias.narrow(0, start, rows)
        weight, bias = weight.to(self.dtype), None if bias is None else bias.to(self.dtype)  # v, o: float32
        return [self._linear(x, weight, bias, split)]

    def op_batch_linear(self, args, x):
        names = args.get("names")
        if not isinstance(names, list) or not 0 < len(names) <= MAX_BATCH:
            raise ProtocolError(f"batch_linear needs a list of 1 to {MAX_BATCH} weight names")
        return [self.op_linear({**args, "name": name}, x)[0] for name in names]

    def op_matmul(self, args, a, b):
        """No weights: rank 0 computes it alone."""
        if a.dim() != b.dim() or a.dim() not in (2, 3) or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
            raise ProtocolError(f"matmul shapes {list(a.shape)} and {list(b.shape)} do not match")
        shape = (*a.shape[:-1], b.shape[-1])
        limit = self.config.num_heads * self.config.max_position_embeddings**2  # all heads' full score square
        if math.prod(shape) > limit:
            raise ProtocolError(f"matmul result {list(shape)} exceeds {limit} elements")
        self.budget.reserve(math.prod(shape) * self.dtype.itemsize, "matmul")
        return [torch.matmul(self._float(a), self._float(b), out=self._out(shape))]

    # -- fused per-layer calls -----------------------------------------------------------------

    def op_qkv(self, session: Session, args, x):
        """x (T, hidden) -> [q | k] (T, q_dim + kv_dim) to the TEE for RoPE; v is cached at [pos, pos+T)."""
        layer, pos = self._layer_pos(session, args)
        x = self._activation(x, self.config.hidden_size)
        self._check_room(session, pos, x.shape[0])
        c = self.config
        # q and k in the server dtype; v, and x cast for it, in float32
        self._reserve_rows(x.shape[0], c.q_dim + c.kv_dim, self.dtype, "qkv", x)
        self._reserve_rows(x.shape[0], c.kv_dim + c.hidden_size, VALUE_DTYPE, "qkv")
        return self._run("qkv", {"session": session.id, "layer": layer, "pos": pos}, x)

    def step_qkv(self, args, x):
        c, (session, layer, pos) = self.config, self._where(args)
        T, weights = x.shape[0], self.layers[layer]
        v = linear(x.to(VALUE_DTYPE), weights.v, weights.v_bias)  # (T, this rank's kv_dim)
        session.values[layer, :, pos : pos + T] = v.view(T, len(self.shard.kv_heads), c.head_dim).transpose(0, 1)
        return [self._column_linear(x, weights.qk, weights.qk_bias, "qk")]

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
        self._float(k)
        _, total = query_tiles(T, pos, c.num_heads, tile)
        self.budget.reserve((total + q.numel()) * self.dtype.itemsize, f"scores of {T} tokens after {pos}")
        session.filled[layer] = pos + T
        return self._run("scores", {"session": session.id, "layer": layer, "pos": pos, "tile": tile}, q, k)

    def step_scores(self, args, q, k):
        c, s, (session, layer, pos) = self.config, self.shard, self._where(args)
        T, heads, kv = q.shape[0], s.heads, s.kv_heads
        group = len(heads) // len(kv)  # this rank's query heads per kv head
        session.keys[layer, :, pos : pos + T] = k[:, kv.start : kv.stop].transpose(0, 1)
        keys_t = session.keys[layer, :, : pos + T].transpose(1, 2)  # (kv, hd, L)
        q = q[:, heads.start : heads.stop].reshape(T, len(kv), group, c.head_dim).permute(1, 2, 0, 3)  # (kv, g, T, hd)
        tiles, total = query_tiles(T, pos, len(heads), args["tile"])
        single = self.ranks.world == 1
        packed = self._out((total,)) if single else torch.empty(total, dtype=self.dtype, device=self.device)
        with one_thread(T <= SMALL_STEP_ROWS):  # see attend
            for t in tiles:
                q_tile = q[:, :, t.row : t.row + t.rows].reshape(len(kv), group * t.rows, c.head_dim)
                out = packed[t.offset : t.offset + len(heads) * t.rows * t.keys].view(len(kv), group * t.rows, t.keys)
                torch.bmm(q_tile, keys_t[:, :, : t.keys], out=out)
        packed.mul_(1.0 / math.sqrt(c.head_dim))
        if single:
            return [packed]
        parts = self.ranks.gather(packed)
        if parts is None:
            return [None]
        tiles, total = query_tiles(T, pos, c.num_heads, args["tile"])
        return [assemble_tiles(self._out((total,)), parts, tiles, [r.heads for r in self.shards])]

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
        _, total = query_tiles(T, pos, c.num_heads, tile)
        if not 0 < T <= cached or tuple(probs.shape) != (total,):
            raise ProtocolError(f"attn_out needs {total} packed probabilities after scores at pos {pos}")
        self._float(probs)
        # probs in float32, P V and its transpose, the result and its float32 partial sums
        values = (total + 2 * T * c.q_dim + T * c.hidden_size) * VALUE_DTYPE.itemsize
        self.budget.reserve(values + T * c.hidden_size * self.dtype.itemsize, f"attention of {T} tokens after {pos}")
        args = {"session": session.id, "layer": layer, "pos": pos, "tile": tile, "tokens": T}
        return self._run("attn_out", args, probs)

    def step_attn_out(self, args, probs):
        weights = self.layers[args["layer"]]
        return [self._row_linear(self.attend(args, probs), weights.o, weights.o_bias, self.config.hidden_size)]

    def attend(self, args, probs) -> torch.Tensor:
        """probs @ V on this rank's heads -> (T, heads * hd) float32, head-major like q_proj: o_proj's input.

        A decode step's attention products (scores too) run on one thread: a batched GEMM this small
        (4 heads of 8 x 64 by 64 x L) took 58-65 us on two threads and 11 us on one, here; on a host
        shared with busy TEE processes the second thread may wait for a core, and the product with it
        (0.6 ms a call, from a profile of 8 clients on 2 cores)."""
        c, s, (session, layer, pos) = self.config, self.shard, self._where(args)
        T, heads, kv = args["tokens"], s.heads, s.kv_heads
        group = len(heads) // len(kv)
        tiles, _ = query_tiles(T, pos, c.num_heads, args["tile"])
        probs = probs.to(VALUE_DTYPE)
        values = session.values[layer]  # (kv, capacity, hd): this rank's kv heads
        out = torch.empty(len(kv), group, T, c.head_dim, dtype=VALUE_DTYPE, device=self.device)
        with one_thread(T <= SMALL_STEP_ROWS):
            for t in tiles:
                block = t.rows * t.keys  # a tile is (heads, rows, keys): this rank's heads are one run of it
                p = probs[t.offset + heads.start * block : t.offset + heads.stop * block]
                o = torch.bmm(p.view(len(kv), group * t.rows, t.keys), values[:, : t.keys])  # (kv, group*rows, hd)
                out[:, :, t.row : t.row + t.rows] = o.view(len(kv), group, t.rows, c.head_dim)
        return out.permute(2, 0, 1, 3).reshape(T, len(heads) * c.head_dim)

    def op_gate_up(self, session: Session, args, x):
        layer = _int_arg(args, "layer", 0, self.config.num_layers - 1)
        x = self._activation(x, self.config.hidden_size)
        self._reserve_rows(x.shape[0], 2 * self.config.intermediate_size, self.dtype, "gate_up", x)
        return self._run("gate_up", {"layer": layer}, x)

    def step_gate_up(self, args, x):
        weights = self.layers[args["layer"]]
        return [self._column_linear(x, weights.gate_up, weights.gate_up_bias, "gate_up")]

    def op_down(self, session: Session, args, x):
        layer = _int_arg(args, "layer", 0, self.config.num_layers - 1)
        x = self._activation(x, self.config.intermediate_size)
        self._reserve_rows(x.shape[0], self.config.hidden_size, VALUE_DTYPE, "down", x)
        return self._run("down", {"layer": layer}, x)

    def step_down(self, args, x):
        weights = self.layers[args["layer"]]
        return [self._linear(x, weights.down, weights.down_bias, "down")]

    # -- private mode ------------------------------------------------------------------------

    def op_masked_linear(self, args, x):
        """x (T, in) float64, a masked activation x + r -> (x + r) W^T + b (T, out) in float64.

        Float64 because the pad is 2^k times larger than x: the product's rounding must stay far below x W^T
        (docs/threat-model.md, numerics). The server never sees x; it needs no session."""
        op, layer = self._masked_op(args)
        if x.dtype != MASKED_DTYPE:
            raise ProtocolError(f"masked_linear takes a float64 activation, not {x.dtype}")
        x = self._shape(x, self._masked_width(op))
        self._reserve_masked(op, layer, x.shape[0], "masked_linear", x)
        return self._run("masked_linear", {"op": op, "layer": layer}, x)

    def step_masked_linear(self, args, x):
        weight, bias = self._masked_weight(args["op"], args["layer"])
        return [self._linear(x, weight, bias, MASKED_SPLITS[args["op"]], MASKED_DTYPE)]

    def op_pad(self, args):
        """A helper server's call: z W^T (rows, out) float64 for the pad z = pad_seeds.expand(seed, rows, in).

        The TEE sends the seed (over CurveZMQ) to this server, which must not be the one that computes on
        x + z s: two servers that do not collude (docs/threat-model.md)."""
        op, layer = self._masked_op(args)
        seed = args.get("seed")
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ProtocolError(f"pad needs a {SEED_BYTES}-byte seed")
        rows = _int_arg(args, "rows", 1, self.config.max_position_embeddings)
        self._reserve_rows(rows, self._masked_width(op), MASKED_DTYPE, "the pad")  # z, expanded from its seed
        self._reserve_masked(op, layer, rows, "pad")
        return self._run("pad", {"op": op, "layer": layer, "seed": seed, "rows": rows})

    def step_pad(self, args):
        op = args["op"]
        weight, _ = self._masked_weight(op, args["layer"])
        pad = expand(args["seed"], args["rows"], self._masked_width(op)).to(self.device)  # the TEE's r, unscaled
        return [self._linear(pad, weight, None, MASKED_SPLITS[op], MASKED_DTYPE)]

    def _masked_ops(self) -> list[tuple[str, int]]:
        layers = [(op, layer) for layer in range(self.config.num_layers) for op in MASKED_LINEARS[:-1]]
        return layers + [("lm_head", 0)]

    def _masked_op(self, args) -> tuple[str, int]:
        op = args.get("op")
        if not isinstance(op, str) or op not in MASKED_LINEARS:
            raise ProtocolError(f"unknown masked linear {op!r}: one of {', '.join(MASKED_LINEARS)}")
        return op, 0 if op == "lm_head" else _int_arg(args, "layer", 0, self.config.num_layers - 1)

    def _masked_width(self, op: str) -> int:
        """The input width of a private-mode linear."""
        c = self.config
        return {"o_proj": c.q_dim, "down": c.intermediate_size}.get(op, c.hidden_size)

    def _masked_parts(self, op: str, layer: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The plain weights (and biases) a private-mode linear's float64 weight is made of."""
        if op == "lm_head":
            return [(self.head, None)]
        w = self.layers[layer]
        return {
            "qkv": [(w.qk, w.qk_bias), (w.v, w.v_bias)],
            "o_proj": [(w.o, w.o_bias)],
            "gate_up": [(w.gate_up, w.gate_up_bias)],
            "down": [(w.down, w.down_bias)],
        }[op]

    def _masked_weight(self, op: str, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's share of a private-mode linear's weight and bias, upcast once to float64."""
        key = (op, layer)
        if key not in self._masked:
            parts = self._masked_parts(op, layer)
            # the value path is kept in float32; in private mode v and o are rounded like every weight
            weight = torch.cat([p.to(self.dtype).to(MASKED_DTYPE) for p, _ in parts])
            biases = [b for _, b in parts if b is not None]
            bias = torch.cat([b.to(self.dtype).to(MASKED_DTYPE) for b in biases]) if biases else None
            self._masked[key] = (weight, bias)
            self._masked_total += _nbytes(weight, bias)
        return self._masked[key]

    # -- outputs: the linears over the ranks' shares -------------------------------------------

    def _out(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Where a result goes: the request's arena slot on a CPU server, else fresh device memory."""
        if self._alloc is not None:
            return self._alloc(shape, dtype or self.dtype)
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def _linear(self, x, weight, bias, split: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """x (T, in) W^T + b split as `split` says (ROW_SPLITS or a kind of Shard.columns)."""
        if split in ROW_SPLITS:
            start, share = self.shard.inputs(split)
            return self._row_linear(x.narrow(1, start, share), weight, bias, weight.shape[0], dtype)
        return self._column_linear(x, weight, bias, split, dtype)

    def _column_linear(self, x, weight, bias, kind: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """x W^T + b where this rank holds some of W's rows (its output columns, Shard.columns(kind)): each
        rank's columns are gathered to rank 0, which assembles the (T, out) result; None on the others."""
        dtype, T = dtype or self.dtype, x.shape[0]
        width, _ = self.shard.columns(kind)
        if self.ranks.world == 1:
            return linear_into(self._out((T, width), dtype), x, weight, bias)
        local = linear_into(torch.empty((T, weight.shape[0]), dtype=dtype, device=self.device), x, weight, bias)
        parts = self.ranks.gather(local)
        if parts is None:
            return None
        return assemble_columns(self._out((T, width), dtype), parts, [r.columns(kind)[1] for r in self.shards])

    def _row_linear(self, x, weight, bias, width: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """sum over ranks of x_r W_r^T, + b: x (T, this rank's inputs), W_r the matching columns of W (o_proj,
        down); the partial sums are reduced to rank 0, which adds the bias once; None on the others.
        Computed in x's dtype (float32 on the value path), rounded to `dtype` once, at the end."""
        dtype, T, leader = dtype or self.dtype, x.shape[0], self.ranks.leader
        direct = x.dtype == dtype
        partial = (
            self._out((T, width), dtype)
            if direct and leader
            else torch.empty((T, width), dtype=x.dtype, device=self.device)
        )
        linear_into(partial, x, weight, bias if leader else None)
        self.ranks.reduce(partial)
        if not leader:
            return None
        return partial if direct else self._out((T, width), dtype).copy_(partial)

    # -- the memory budget (budget.py) ---------------------------------------------------------

    def _reserve_rows(self, rows: int, width: int, dtype: torch.dtype, what: str, x: torch.Tensor | None = None):
        """A (rows, width) result; and x again where a batch concatenates its requests' inputs."""
        self.budget.reserve(rows * width * dtype.itemsize + (x.nbytes if x is not None else 0), what)

    def _reserve_masked(self, op: str, layer: int, rows: int, what: str, x: torch.Tensor | None = None) -> None:
        """A private-mode product's (rows, out) float64 result, and its float64 weight when not made yet."""
        made = self._masked.get((op, layer))
        out = made[0].shape[0] if made else sum(w.shape[0] for w, _ in self._masked_parts(op, layer))
        self._reserve_rows(rows, out, MASKED_DTYPE, what, x)
        if made is None:
            self.budget.reserve(self._masked_bytes(op, layer), "a float64 weight")

    def _masked_bytes(self, op: str, layer: int) -> int:
        """A private-mode linear's float64 weight and bias, as _masked_weight makes them (this rank's share)."""
        parts = self._masked_parts(op, layer)
        return sum(w.numel() + (b.numel() if b is not None else 0) for w, b in parts) * MASKED_DTYPE.itemsize

    # -- validation helpers --------------------------------------------------------------------

    def _where(self, args) -> tuple[Session, int, int]:
        """A step's session (this rank's share of its cache), layer and position, resolved by rank 0."""
        return self.sessions[args["session"]], args["layer"], args["pos"]

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


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.nbytes for t in tensors if t is not None)


def _int_arg(args: dict, name: str, low: int, high: int) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"argument {name!r} must be an integer in [{low}, {high}], got {value!r}")
    return value
