"""Decoding loops: autoregressive and speculative, sharing prefill and sampling."""
