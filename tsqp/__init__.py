"""TSQP: LLaMA-family language models split between a trusted TEE process and an untrusted GPU server."""

import os

# The TEE and the server take turns on the same cores. OpenMP's default is to spin-wait after each
# parallel region, so the idle side would burn the cores the busy side needs (measured: a 2-layer
# prefill 0.48 s spinning against 0.01 s passive). It must be set before torch is first imported.
if "OMP_WAIT_POLICY" in os.environ:
    os.environ.setdefault("TSQP_USER_OMP_WAIT_POLICY", os.environ["OMP_WAIT_POLICY"])
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
