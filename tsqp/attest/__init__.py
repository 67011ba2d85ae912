"""Remote attestation: evidence that the API's TLS key and its model live in a TEE, and its check.

evidence.py binds the TLS key, the model and the settings into a quote's 64 bytes of report data;
sources.py gets a quote from the platform (Gramine SGX, TDX configfs-tsm, or none); verify.py is the
client's side (dcap-qvl against Intel's collateral, then the measurement and the binding); client.py
reads a server's evidence over the very TLS connection whose certificate it checks, and pins
clients to the attested key.
"""
