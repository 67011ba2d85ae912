"""Measurement: the split-vs-monolithic benchmark (`bench`), its random prompts (`prompts`), the transformers
baseline (`reference`, the only importer of transformers), several clients at once (`load`), and the
transport diagnosis (`diagnose`)."""
