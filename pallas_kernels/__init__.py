"""Pallas kernels for sparse-KV attention, importable without `budgetdraft`.

Each kernel file has the kernel, a pure-jnp `*_reference` with the same signature, and a wrapper that
picks the backend: compiled Pallas on TPU (Mosaic) and GPU (Triton), interpret mode on CPU.
"""

from pallas_kernels import backend
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention import block_sparse_attention_reference
from pallas_kernels.sparse_decode_attention import sparse_decode_attention
from pallas_kernels.sparse_decode_attention import sparse_decode_attention_reference
