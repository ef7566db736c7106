"""KV selection for the drafter's sparse cache: policies score prompt keys, one rule keeps B.

A policy is a score function (`policies.POLICIES`); `selection.keep_mask` is the one rule that
turns scores into a kept set (sinks and the recent window always kept, the rest of the budget by
top score, per layer and KV head), and `selection.sparse_cache` builds the drafter's
`SparseKVCache` from a prefilled full cache. Training views (BudgetDraft) use the same rule, so what
the drafter learns is what it sees at inference.
"""
