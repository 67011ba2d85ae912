"""TSQP: LLaMA-family language models split between a trusted TEE process and an untrusted GPU server."""

__version__ = "0.1.0"
