"""Between the two processes: the protocol, the ZeroMQ client and endpoints, the shared-memory arena and its
doorbell, CurveZMQ keys. Both sides import it; everything read from it is validated before use."""
