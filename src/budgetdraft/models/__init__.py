"""Llama-family decoder, its configs and checkpoint import."""
