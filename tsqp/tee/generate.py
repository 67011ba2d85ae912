"""Text generation with the server-side KV cache: one prefill over the prompt, then one token at a time.

The server keeps each session's post-RoPE keys and values, so a decode step sends one token's
activations and one row of scores and probabilities per layer; the prompt is never sent again.
Sampling runs here, in the TEE, from a generator seeded once per generation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch

from tsqp.errors import ConnectionLost, TsqpError
from tsqp.model.config import ModelConfig
from tsqp.tee.forward import TeeModel
from tsqp.tee.sampling import SamplingOptions, sample

GREEDY = SamplingOptions()


@dataclass
class Generation:
    prompt_ids: list[int]
    generated_ids: list[int]  # the eos token, when one ended the generation, included
    stop_reason: str  # "eos", "length", or "stop" (on_token asked to stop)
    ttft_s: float  # session open + prefill + first sample: the wait for the first token
    decode_s: float  # every later token
    decode_rpc_calls: int  # round trips of the decode steps (counted by the socket client; 0 in process)
    decode_bytes: int  # bytes sent and received by the decode steps

    @property
    def decode_tokens(self) -> int:
        return len(self.generated_ids) - 1

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_tokens else 0.0


def session_capacity(config: ModelConfig, prompt_tokens: int, max_new_tokens: int) -> int:
    """Cache positions a generation needs; the last token is sampled but never fed back, so it needs none."""
    if max_new_tokens < 1:
        raise TsqpError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    capacity = prompt_tokens + max_new_tokens - 1
    if capacity > config.max_position_embeddings:
        raise TsqpError(
            f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed the model's "
            f"{config.max_position_embeddings} positions: lower --max-new-tokens or shorten the prompt"
        )
    return capacity


@contextmanager
def kv_session(tee: TeeModel, capacity: int) -> Iterator[None]:
    """A server-side KV cache of `capacity` positions for the block, freed on the way out.

    After ConnectionLost no close is sent (it would only wait out another timeout): the server's idle
    timeout frees the session. A failed close never hides the error that ended the block.
    """
    tee.ops.open_session(capacity)
    try:
        yield
    except ConnectionLost:
        raise
    except BaseException:
        with suppress(TsqpError):
            tee.ops.close_session()
        raise
    tee.ops.close_session()


def generate(
    tee: TeeModel,  # or what it asks of one: api/batcher.BatchedSequence
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingOptions = GREEDY,
    eos_ids: Iterable[int] = (),
    on_token: Callable[[int], bool | None] | None = None,
) -> Generation:
    """Up to max_new_tokens tokens after prompt_ids; stops early after a token of eos_ids, or after a token
    for which on_token returns True (a stop string seen in the text, say). An exception raised by on_token
    (a client gone) ends the generation and frees the session."""
    capacity = session_capacity(tee.config, len(prompt_ids), max_new_tokens)
    prompt = torch.tensor(prompt_ids, dtype=torch.int64)
    tee.check_ids(prompt)
    eos = frozenset(eos_ids)
    generator = sampling.generator()
    stats = tee.stats
    generated: list[int] = []
    stopped = False

    def emit(logits: torch.Tensor) -> bool:
        """Samples from (1, vocab) logits; True when generation should go on."""
        nonlocal stopped
        token = sample(logits[0], sampling, generator)
        generated.append(token)
        stopped = bool(on_token(token)) if on_token else False
        return not stopped and token not in eos and len(generated) < max_new_tokens

    def traffic() -> tuple[int, int]:
        return stats.rpc_calls, stats.bytes_sent + stats.bytes_received

    start = time.perf_counter()
    with kv_session(tee, capacity):
        going = emit(tee.forward(prompt, 0, last_only=True))
        first, (calls, nbytes) = time.perf_counter(), traffic()
        pos = len(prompt_ids)
        while going:
            going = emit(tee.forward(torch.tensor(generated[-1:]), pos, last_only=True))
            pos += 1
        end, (calls_end, nbytes_end) = time.perf_counter(), traffic()
    return Generation(
        prompt_ids=list(prompt_ids),
        generated_ids=generated,
        stop_reason="stop" if stopped else "eos" if generated[-1] in eos else "length",
        ttft_s=first - start,
        decode_s=end - first,
        decode_rpc_calls=calls_end - calls,
        decode_bytes=nbytes_end - nbytes,
    )
