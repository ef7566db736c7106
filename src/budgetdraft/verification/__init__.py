"""Lossless verification rules for speculative decoding.

Every rule is a pure function `(draft_tokens, q, p, rng) -> (num_accepted, next_token[, path])` over
float32 probabilities (after temperature / top-p). Single-path rules take draft_tokens [gamma],
q [gamma, V], p [gamma + 1, V]; multi-path rules take a leading paths axis and also return the path.
Each sampling rule draws from an exact outcome law (`*_law`), so its losslessness is proven by
exact enumeration on tiny vocabularies (tests/test_verification.py).
"""

from budgetdraft.verification import block, greedy, multipath, tokenwise

# name -> (rule, takes a leading paths axis)
RULES = {
    "tokenwise": (tokenwise.verify_tokenwise, False),
    "block": (block.verify_block, False),
    "greedy": (greedy.verify_greedy_multipath, True),
    "specinfer": (multipath.verify_specinfer, True),
    "gbv": (multipath.verify_gbv, True),
}
