"""Decoding loops: autoregressive and speculative, sharing sampling and the model's prefill."""
