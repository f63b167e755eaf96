import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from trim_select.testing import make_model_dir  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
BENCH = SHARED / "bench"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (GQA: 4 heads, 2 kv heads) + locally trained tokenizer."""
    return make_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from trim_select.models import load_model

    return load_model(str(tiny_dir), device="cpu", dtype="float32")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # keep model conversions out of the user's cache, except the SmolLM2 one (expensive to rebuild)
    if "TRIM_SELECT_CACHE" not in os.environ:
        monkeypatch.setenv("TRIM_SELECT_CACHE", str(Path.home() / ".cache" / "trim-select"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): two
    threads on a CPU shared with other jobs make tiny-model matmuls up to 100x slower (spin waits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
