"""BudgetDraft training: one drafter robust to every KV budget (views, losses, step, loop)."""
