"""Shared fixtures: tiny random models for algorithms, the real SmolLM2 verifier for end-to-end checks."""

import gc
import os

import jax
import pytest

from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import init_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
  """Frees each test module's compiled programs when it ends. XLA:CPU maps compiled code into
  memory regions that live as long as the program is cached; the whole suite's programs would
  exceed the kernel's limit on mappings (vm.max_map_count, 65530) and crash the compiler."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def data_dir():
  path = os.environ.get("BUDGETDRAFT_DATA_DIR", os.path.join(REPO_ROOT, "data"))
  if not os.path.isdir(os.path.join(path, "long_books")):
    pytest.fail(f"long_books is not prepared under {path}: run `make data`")
  return path


@pytest.fixture(scope="session")
def tiny_model():
  config = get_config("tiny")
  return config, init_params(config, jax.random.key(0))


@pytest.fixture(scope="session")
def smollm2():
  """(config, params, tokenizer) of the default verifier, loaded once per test session."""
  verifier = checkpoint_io.load()
  return verifier.config, verifier.params, verifier.tokenizer
