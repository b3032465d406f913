import os
from pathlib import Path

# The tests never reach the Hugging Face Hub: Hub ids resolve from caches they lay out (tests/fixtures/hub.py),
# and every process they start inherits this.
os.environ["HF_HUB_OFFLINE"] = "1"

# --- tiny models (services/models/tiny_model.py): built once, cached under $RPO_CACHE_DIR or .cache/models ---

import pytest

pytest_plugins = [
    "tests.fixtures.rollout",  # real rollout replicas: rollout_server, rollout_server_factory
    "tests.fixtures.hub",  # a Hugging Face cache laid out offline: hub_home, offline_hub
]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A random tiny Qwen2 with tied embeddings (HF directory; seconds to build the first time)."""
    from services.models.tiny_model_cache import cached_tiny_model

    return cached_tiny_model("random-tied")


@pytest.fixture(scope="session")
def tiny_model_untied_dir() -> Path:
    """A random tiny Qwen2 with a separate LM head."""
    from services.models.tiny_model_cache import cached_tiny_model

    return cached_tiny_model("random-untied")


@pytest.fixture(scope="session")
def warm_model_dir() -> Path:
    """The tiny Qwen2 warm-started on the synthetic task (about 2 minutes the first time, then cached)."""
    from services.models.tiny_model_cache import cached_tiny_model

    return cached_tiny_model("warm")


# --- end of tiny models ---
