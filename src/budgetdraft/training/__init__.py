"""BudgetDraft training: one drafter robust to every KV budget (losses and budget sampling so far)."""
