"""How a one-time pad is expanded from its seed: the contract between the TEE and a helper server.

A pad seed is 32 secret bytes. `expand(seed, rows, width)` turns it into a (rows, width) float64 matrix
of independent standard Gaussians: the AES-256-CTR keystream under the seed (a cryptographic generator:
without the seed the pad cannot be told from true randomness), read as 52-bit uniforms, through the
Box-Muller transform, row by row (in each row the first half of the uniforms
gives the radii, the second the angles; the row is r sin, then r cos). Row i uses only its own stretch
of the keystream, so any run of rows
can be expanded alone (`start_row`): the counter is seeked, nothing before it is computed.

The TEE scales the result by the linear's pad scale (a power of two, so the product is exact) and sends
x + r; a helper that holds the seed computes the same z W^T. Each seed is used for one pad only.
"""

from __future__ import annotations

import math
import secrets

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_MANTISSA = (1 << 52) - 1
_ONE = 0x3FF0000000000000  # the bits of 1.0
_AES_BLOCK = 16
_PIECE = 1 << 20  # keystream made a MiB at a time: the CTR plaintext (zeros) is one small fixed buffer
_ZEROS = memoryview(bytes(_PIECE))


def new_seed() -> bytes:
    return secrets.token_bytes(SEED_BYTES)


def expand(seed: bytes, rows: int, width: int, start_row: int = 0) -> torch.Tensor:
    """Rows [start_row, start_row + rows) of the seed's pad: (rows, width) float64 standard Gaussians."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"a pad seed is {SEED_BYTES} bytes")
    even = width + width % 2  # Box-Muller makes two per pair of uniforms; a row's pairs stay in the row
    words = torch.empty(rows, even, dtype=torch.int64)
    raw = words.numpy().reshape(-1).view("uint8")
    counter = (start_row * even * 8 // _AES_BLOCK).to_bytes(_AES_BLOCK, "big")
    stream = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    for start in range(0, raw.nbytes, _PIECE):  # the counter carries across pieces
        piece = raw[start : start + _PIECE]
        stream.update_into(_ZEROS[: piece.nbytes], piece)
    # 52 random mantissa bits under the exponent of 1.0: a float64 uniform in [1, 2), in place (no
    # integer-to-float conversion, which cost more than the rest)
    words.bitwise_and_(_MANTISSA).bitwise_or_(_ONE)
    uniform = words.view(torch.float64)
    half = even // 2
    radius, angle = uniform[:, :half], uniform[:, half:]
    radius.neg_().add_(2.0).log_().mul_(-2.0).sqrt_()  # from 2 - u in (0, 1]: the logarithm is finite
    angle.sub_(1.0).mul_(2 * math.pi)
    sine = torch.sin(angle)
    torch.cos(angle, out=angle)
    angle.mul_(radius)
    radius.mul_(sine)
    return uniform[:, :width]
