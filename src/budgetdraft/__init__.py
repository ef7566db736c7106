"""budgetdraft: lossless speculative decoding with sparse-KV drafters for 4K-16K contexts."""
