"""Private mode: the ops of the forward pass with nothing of the prompt leaving the TEE unmasked.

    embedding   in the TEE, from the whole table loaded at start (reading rows on demand would show the
                host, through the file offsets, which tokens the prompt holds); token ids never leave
    linears     qkv (v too), o_proj, gate_up, down, lm_head: x + r out, r a fresh pad (linear.Masked)
    attention   in the TEE over its own KV cache (attention.py): no q, k, v, score or probability crosses

What the server still learns: how many tokens each call carries, the order and timing of calls
(docs/threat-model.md). `LinearOps` is the forward pass's ops over a linear seam with attention in the
TEE; `PrivateOps` is its private composition: the seam is small layers (linear.py), the Freivalds check
on every masked product and the remote call (made in `init`), under the mask (`install_scales`, once the
pad scales are known: nothing is sent before); the pads come from a pool computed in the TEE or from a
helper server (pads.py).

Pad scales: one per linear, fixed for the process, 2^PAD_BITS times the largest input that linear saw
on a public calibration text run through the model in the TEE itself (compose.calibrate: a TeeModel over
`LinearOps` whose linear is `Recording(Local)`, from the TEE's own weights, one op at a time). A scale
never depends on the values of the row it masks.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tsqp.errors import TsqpError
from tsqp.model.checkpoint import Checkpoint
from tsqp.model.config import ModelConfig
from tsqp.stats import Stats
from tsqp.tee.attention import TeeAttention
from tsqp.tee.calls import server_dtype
from tsqp.tee.freivalds import masked_keys
from tsqp.tee.linear import Checked, Linear, Masked, Remote, leak_bits
from tsqp.tee.op_weights import Op, model_ops
from tsqp.tee.ops import Link
from tsqp.tee.pads import Ahead, HelperPads, PoolPads
from tsqp.tee.tokenizer import TOKENIZER_FILE, TextTokenizer

PAD_BITS = 20  # pads 2^20 times the largest calibrated input: docs/threat-model.md has the table
PAD_BITS_RANGE = (8, 28)  # below: pads too small to hide much; above: x drowns in float64 rounding
CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue; "
    "what is the capital of France? Paris! Numbers like 3.14159, 42 and 1,000,000 appear too."
)
CALIBRATION_TOKENS = 64
LM_HEAD_ROWS = 256  # 256 x 32000 float64 masked logits, pads and result: 66 MB each


@dataclass
class PrivateOptions:
    pads_dir: Path  # pool files and the pool key
    helper: object | None = None  # a link (wire.client.Client) to a helper server: pads from it, none stored
    pad_bits: int = PAD_BITS
    seed: int | None = None  # the Freivalds generator's seed, for tests only


class LinearOps:
    """The forward pass's ops (`ops.Ops`) over a linear seam: the embedding from the TEE's own table, every
    product through `linear(op, x)` (fused qkv: v stays here), `attention` in the TEE (`TeeAttention`, the
    seam itself is the op)."""

    pipelined = False
    fused = False  # no fused calls: the server sees only masked inputs, one product each

    def checks_overlap(self, tokens: int) -> bool:
        """Never: each masked product is checked before it is unmasked."""
        return False

    def __init__(self, config: ModelConfig, embed: torch.Tensor | None, linear: Linear | None, stats: Stats):
        """embed: the whole embedding table (None until init); linear: None until attached."""
        self.config, self.embed, self.linear, self.stats = config, embed, linear, stats
        self.attention = TeeAttention(config, lambda layer, out, _residual: self._run(Op("o_proj", layer), out), stats)

    def init(self) -> dict:
        """Nothing to meet: the seam is the TEE's own (a subclass meets a server)."""
        return {}

    def open_session(self, capacity: int) -> None:
        self.attention.open_session(capacity)

    def close_session(self) -> None:
        self.attention.close_session()

    def begin_step(self, pos: int, T: int) -> None:
        """Every masked product is checked before its result is used: nothing waits for the step."""

    def _run(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        if self.linear is None:
            raise TsqpError("private mode: attach the model first (init and calibrate)")
        if self.attention.cache is None and op.name != "lm_head":
            raise TsqpError("private mode: open a session before the per-layer calls")
        return self.linear(op, x)  # x float32: x + r is formed in float64 by Masked, the result rounded back

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        with self.stats.tee("embedding"):
            return self.embed[ids].to(torch.float32)

    def qkv(self, layer: int, pos: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        q, k, v = self._run(Op("qkv", layer), h).split([c.q_dim, c.kv_dim, c.kv_dim], dim=1)
        self.attention.put_values(layer, pos, v)
        return q, k

    def gate_up(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inter = self.config.intermediate_size
        gate, up = self._run(Op("gate_up", layer), h).split([inter, inter], dim=1)
        return gate, up

    def down(self, layer: int, a: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual: unused (private mode fuses no calls: the server sees only masked inputs)."""
        return self._run(Op("down", layer), a)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """By LM_HEAD_ROWS rows: the float64 masked logits of a long prompt would be the TEE's peak memory."""
        chunks = [self._run(Op("lm_head"), part) for part in x.split(LM_HEAD_ROWS)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class PrivateOps(LinearOps):
    """Private mode: `LinearOps` whose seam is Masked(Checked(Remote)), or Masked(Remote) unverified."""

    def __init__(self, link: Link, checkpoint: Checkpoint, options: PrivateOptions, stats: Stats, verify: bool = True):
        super().__init__(checkpoint.config, None, None, stats)
        self.link, self.checkpoint = link, checkpoint
        self.options, self.verify = options, verify
        self.wire = torch.float32  # the server's dtype, known after init: the pads' weights are rounded to it
        self.unmasked: Linear | None = None  # the check and the remote call, under the mask
        self.masked: Masked | None = None
        self.checked: Checked | None = None
        self.pads = None
        self.scales: dict[Op, float] = {}
        self.setup_s = 0.0  # keys, embedding table and calibration, at start
        self.calibration_s = 0.0

    @property
    def wire_name(self) -> str:
        return str(self.wire).removeprefix("torch.")

    def init(self) -> dict:
        """Meets the private server (and the helper), makes the keys and the pad source; the seam stays
        closed (`linear` None) until `install_scales`."""
        low, high = PAD_BITS_RANGE
        if not low <= self.options.pad_bits <= high:
            raise TsqpError(f"--pad-bits must be in [{low}, {high}], not {self.options.pad_bits}")
        info = self.link.wait(self.link.submit("init", {"private": True})).args
        wire = server_dtype(info)
        if self.options.helper is not None:
            check_helper(self.options.helper, info)
        start = time.perf_counter()
        self.wire = wire
        self.embed = self.checkpoint.tensor("model.embed_tokens.weight")  # whole: no offsets name the tokens
        remote: Linear = Remote(self.link, self.config, self.stats)
        if self.verify:
            seed = secrets.randbits(63) if self.options.seed is None else self.options.seed
            keys = masked_keys(self.checkpoint, self.wire, torch.Generator().manual_seed(seed))
            self.checked = Checked(remote, keys, self.stats)
        if self.pads is not None:
            self.pads.close()
        if self.options.helper is not None:
            self.pads = HelperPads(self.options.helper, self.config, self.checked, self.stats)
        else:
            fingerprint = self.checkpoint.fingerprint()  # the TEE's own: pools are made from its weights
            pool = PoolPads(self.checkpoint, fingerprint, self.wire, self.options.pads_dir, self.stats)
            self.pads = Ahead(pool, self.config)  # the next op's pad taken while this one's product is made
        self.linear = None  # install_scales masks it: nothing is sent before the pad scales are known
        self.unmasked = self.checked or remote
        self.setup_s = time.perf_counter() - start
        return info

    def install_scales(self, largest: dict[Op, float], seconds: float) -> None:
        """The pad scales from each linear's largest calibration input (`seconds` to find them): the seam
        is masked from now on."""
        bits = self.options.pad_bits
        self.scales = {
            op: 2.0 ** (bits + math.ceil(math.log2(max(largest.get(op, 1.0), 2.0**-30))))
            for op in model_ops(self.config)
        }
        self.masked = Masked(self.unmasked, self.pads, self.scales, self.stats)
        self.linear = self.masked
        self.calibration_s = seconds
        self.setup_s += seconds

    def open_session(self, capacity: int) -> None:
        super().open_session(capacity)
        self.pads.reserve(capacity)  # computing missing pads now is offline work, not the prefill's

    def close(self) -> None:
        if self.pads is not None:
            self.pads.close()

    def leak_bound_bits(self) -> float:
        """The bound on what one masked coordinate revealed, over every input masked so far."""
        return leak_bits(self.masked.ratio) if self.masked else 0.0


def check_helper(helper, primary: dict) -> None:
    """The helper must be another server than the primary (it would hold both x + r and r) and hold the
    same weights in the same dtype (its z W^T would not cancel the primary's otherwise)."""
    info = helper.wait(helper.submit("init", {"private": True})).args
    if info.get("instance") == primary.get("instance"):
        raise TsqpError(
            "--helper names the same server as the one computing on the masked activations: it would see both "
            "x + r and r; the helper must be a second server, run by another party"
        )
    if info.get("fingerprint") != primary.get("fingerprint") or info.get("dtype") != primary.get("dtype"):
        raise TsqpError(
            f"the helper runs another model or dtype ({info.get('dtype')}) than the server ({primary.get('dtype')}): "
            "start both with the same checkpoint and --dtype"
        )


def calibration_ids(model_dir: Path, config: ModelConfig) -> torch.Tensor:
    """The public calibration prompt: CALIBRATION_TEXT through the model's tokenizer when it has one,
    else a fixed spread of ids (the first one bos when the config names it)."""
    if (Path(model_dir) / TOKENIZER_FILE).is_file():
        ids = TextTokenizer(model_dir).encode(CALIBRATION_TEXT)[:CALIBRATION_TOKENS]
    else:
        ids = [(i * 7919 + 11) % config.vocab_size for i in range(CALIBRATION_TOKENS)]
        if config.bos_token_id is not None and 0 <= config.bos_token_id < config.vocab_size:
            ids[0] = config.bos_token_id
    return torch.tensor(ids[: config.max_position_embeddings], dtype=torch.int64)
