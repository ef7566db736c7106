"""KV selection for the drafter's sparse cache: policies score prompt keys, one selector keeps B.

A policy is a score function (policies.py); `selection.select_kept` turns scores into the kept set
(sinks and the recent window always kept, the rest of the budget by top score, per layer and KV
head), and `selection.compress` gathers it into a `SparseKVCache`. Training views (BudgetDraft) use
the same two functions, so what the drafter learns is what it sees at inference.
"""
