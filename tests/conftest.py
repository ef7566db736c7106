"""Shared fixtures: tiny random models for algorithms, the real SmolLM2 verifier for end-to-end checks."""

import os

import jax
import pytest

from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import init_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
