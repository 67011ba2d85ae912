"""Measurement: the split-vs-monolithic benchmark, the transformers baseline (the only importer of
transformers), and the transport diagnosis."""
