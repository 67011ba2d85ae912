"""The trusted side: the forward pass, the typed and verified calls to the server, generation, sampling and
the tokenizer. It imports nothing from `tsqp.server` or `tsqp.measure`, nor transformers
(tests/test_layout.py): this and `tsqp.model`, `tsqp.wire` are what an enclave has to trust."""
