"""Measurement as library code: acceptance replay, speedup, decode speed against the bandwidth floor,
kernel speed, verification-rule efficiency, budget robustness, perplexity, timing, and result
tables and figures.

Experiments (`experiments/*.py`) only parse their config, call these and write the results.
"""
