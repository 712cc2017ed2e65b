"""Session-scoped tiny Hugging Face models saved to disk (see tiny_models.py)."""
from __future__ import annotations

import pytest

from tests.model.tiny_models import TINY_CONFIGS, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """name -> folder with config.json + safetensors; the llama one is sharded (index.json)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: save_tiny_model(name, str(root / name), max_shard_size="60KB" if name == "llama" else None)
            for name in TINY_CONFIGS}
