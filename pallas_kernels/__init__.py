"""Pallas kernels for sparse-KV attention; importable without `budgetdraft` (kernels land with issue 6)."""
