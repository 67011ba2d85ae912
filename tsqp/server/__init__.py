"""The untrusted side: the engine that holds the weights, sessions and KV caches, and its socket loop.
It imports nothing from `tsqp.tee`."""
