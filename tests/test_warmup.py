"""Warmup LoRA fine-tuning (SPEC.md "Warmup", paper Table 7): training, label mask, checkpoints, resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from samples import adapter_tensors, chat_records, train_interrupted

from trim_select.data import Message, Record
from trim_select.pipeline import aggregate_scores
from trim_select.testing import make_model, make_tokenizer
from trim_select.training.checkpoints import (
    Checkpoint,
    checkpoint_weights,
    choose_checkpoints,
    list_checkpoints,
    load_optimizer_state,
)
from trim_select.training.lora import (
    LoraRecipe,
    epoch_order,
    label_loss_sum,
    lr_at,
    train_lora,
    training_renderer,
    training_sequence,
)
from trim_select.warmup import draw_subset, warmup

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Tiny-model settings: fast, and strong enough to move the loss (Table 7 values are tested separately).
FAST = LoraRecipe(lr=3e-2, epochs=8, batch_size=4, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                  warmup_ratio=0.0, schedule="constant", micro_batch_tokens=512)


@pytest.fixture(scope="module")
def learnable_dir(tmp_path_factory):
    """The tiny Llama with 8x larger (tied) embeddings: random init at std 0.02 caps the logits so low
    that no adapter can move the loss far from log(vocab); this one can learn."""
    d = tmp_path_factory.mktemp("learnable")
    tok = make_tokenizer(d)
    model = make_model(len(tok))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    model.save_pretrained(d)
    return d


def test_recipe_defaults_are_table_7():
    r = LoraRecipe()
    assert (r.lr, r.schedule, r.warmup_ratio, r.epochs) == (2e-5, "linear", 0.03, 4)
    assert (r.batch_size, r.max_length, r.seed) == (64, 2048, 0)
    assert (r.lora_r, r.lora_alpha, r.lora_dropout) == (128, 512, 0.1)
    assert r.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(ValueError):
        LoraRecipe(warmup_ratio=1.5)


def test_lr_schedule_matches_hf_linear_warmup():
    from transformers import get_linear_schedule_with_warmup

    recipe = LoraRecipe(lr=2e-5, warmup_ratio=0.03)
    total = 70
    warm = math.ceil(total * 0.03)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    sched = get_linear_schedule_with_warmup(opt, warm, total)
    for step in range(total):
        assert lr_at(step, total, recipe) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15)
        opt.step()
        sched.step()


def test_only_assistant_tokens_carry_loss(tiny_dir, tiny):
    tok = tiny.tokenizer
    rec = Record(0, 1, "x", (Message("user", "What is 2 plus 2?"), Message("assistant", "The answer is 4."),
                             Message("user", "And 3 plus 3?"), Message("assistant", "It is 6.")), b"{}")
    seq = training_sequence(rec, training_renderer(tok, LoraRecipe()))
    # the label mask is exactly both assistant contents, each with its end-of-turn token
    assert tok.decode(seq.input_ids[seq.scope_mask]) == "The answer is 4.<|im_end|>It is 6.<|im_end|>"
    no_eos = training_sequence(rec, training_renderer(tok, LoraRecipe()), train_eos=False)
    assert tok.decode(no_eos.input_ids[no_eos.scope_mask]) == "The answer is 4.It is 6."

    # the training loss equals HF's cross-entropy with every non-label position set to -100
    from trim_select.batching import collate

    batch = collate([seq], torch.device("cpu"))
    n = int(seq.scope_mask[1:].sum())
    ours = label_loss_sum(tiny.model, batch) / n
    labels = torch.where(batch["scope_mask"], batch["input_ids"], torch.full_like(batch["input_ids"], -100))
    ref = tiny.model(input_ids=batch["input_ids"], labels=labels).loss
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_warmup_changes_lora_weights_and_loss_decreases_on_repeated_data(learnable_dir, tmp_path):
    from trim_select.models import load_model

    records = chat_records(4) * 2  # a repeated tiny dataset: the model can memorise it
    res = train_lora(str(learnable_dir), records, tmp_path / "w", FAST, progress=False)
    losses = res.losses
    assert len(losses) == 8 * 2
    assert np.mean(losses[-4:]) < losses[0] - 0.3, losses
    lora_b = [t for k, t in adapter_tensors(res.final).items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # B starts at zero
    base = load_model(str(learnable_dir), device="cpu", dtype="float32").model
    warm = load_model(str(res.final), device="cpu", dtype="float32").model  # adapter merged
    q0 = base.model.layers[0].self_attn.q_proj.weight
    q1 = warm.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q0, q1)
    assert torch.equal(base.model.layers[0].mlp.up_proj.weight, warm.model.layers[0].mlp.up_proj.weight)


def test_checkpoints_follow_the_shared_contract(tiny_dir, tmp_path):
    recipe = LoraRecipe(lr=1e-3, epochs=2, batch_size=3, lora_r=4, lora_alpha=8, warmup_ratio=0.3)
    res = train_lora(str(tiny_dir), chat_records(6), tmp_path / "w", recipe, progress=False)
    ckpts = list_checkpoints(tmp_path / "w")
    assert [c.name for c in ckpts] == ["step-000002", "step-000004"]  # one per epoch
    for c in ckpts:
        files = {p.name for p in c.path.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "trim_select_base.json", "state.json",
                "optimizer.safetensors"} <= files
        assert json.loads((c.path / "trim_select_base.json").read_text())["base"] == str(tiny_dir.resolve())
        state = json.loads((c.path / "state.json").read_text())
        assert {"step", "epoch", "learning_rate", "loss", "tokens"} <= set(state)
        # learning_rate = mean lr of the steps since the previous checkpoint (LESS's checkpoint weight)
        seg = [h["lr"] for h in state["history"]][c.step - 2:c.step]
        assert state["learning_rate"] == pytest.approx(np.mean(seg))
        moments = load_optimizer_state(c.path)
        assert set(moments) == set(adapter_tensors(c.path))  # keyed by the adapter file's names
        assert all(set(m) == {"exp_avg", "exp_avg_sq"} for m in moments.values())
    assert {p.name for p in res.final.iterdir()} == {"adapter_model.safetensors", "adapter_config.json",
                                                     "trim_select_base.json"}
    last = adapter_tensors(ckpts[-1].path)
    assert all(torch.equal(t, last[k]) for k, t in adapter_tensors(res.final).items())
    summary = json.loads((tmp_path / "w" / "train.json").read_text())
    assert len(summary["losses"]) == 4 and summary["tokens_per_s"] > 0


def test_resume_after_interruption_gives_same_final_adapter(tiny_dir, tmp_path):
    # dropout on, checkpoints mid-epoch: the resumed run must redo the same dropout masks and data order
    recipe = LoraRecipe(lr=5e-3, epochs=3, batch_size=3, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                        warmup_ratio=0.2, save_steps=2, micro_batch_tokens=64)
    records = chat_records(8)  # 3 steps per epoch, 9 in all; checkpoints at 2, 4, 6, 8, 9
    ref = train_lora(str(tiny_dir), records, tmp_path / "ref", recipe, progress=False)

    train_interrupted(train_lora, str(tiny_dir), records, tmp_path / "cut", recipe, progress=False, at=5)
    assert not (tmp_path / "cut" / "final").exists()
    assert list_checkpoints(tmp_path / "cut")[-1].step == 4
    seen: list[int] = []
    res = train_lora(str(tiny_dir), records, tmp_path / "cut", recipe, progress=False,
                     on_step=lambda s, _r: seen.append(s))
    assert seen == [5, 6, 7, 8, 9]  # continued from step-000004, did not start over
    a, b = adapter_tensors(ref.final), adapter_tensors(res.final)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert res.losses == pytest.approx(ref.losses, rel=1e-6)
    # a finished run is not retrained
    again = train_lora(str(tiny_dir), records, tmp_path / "cut", recipe, progress=False,
                       on_step=lambda s, _r: pytest.fail("retrained a finished run"))
    assert again.cached


def test_refuses_to_resume_with_other_settings(tiny_dir, tmp_path):
    recipe = LoraRecipe(lr=1e-3, epochs=1, batch_size=4, lora_r=4, lora_alpha=8)
    train_lora(str(tiny_dir), chat_records(4), tmp_path / "w", recipe, progress=False)
    with pytest.raises(RuntimeError, match="different settings"):
        other = LoraRecipe(lr=2e-3, epochs=1, batch_size=4, lora_r=4, lora_alpha=8)
        train_lora(str(tiny_dir), chat_records(4), tmp_path / "w", other, progress=False)


def test_micro_batch_split_does_not_change_the_update(tiny_dir, tmp_path):
    # the loss is normalised by the response tokens of the whole effective batch (not per micro-batch),
    # and padding is masked: one padded micro-batch of 6 == six unpadded micro-batches of 1
    base = LoraRecipe(lr=1e-2, epochs=1, batch_size=6, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      warmup_ratio=0.0)
    one = train_lora(str(tiny_dir), chat_records(6), tmp_path / "one", replace(base, micro_batch_size=6),
                     progress=False)
    many = train_lora(str(tiny_dir), chat_records(6), tmp_path / "many", replace(base, micro_batch_size=1),
                      progress=False)
    a, b = adapter_tensors(one.final), adapter_tensors(many.final)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_training_leaves_global_rngs_untouched(tiny_dir, tmp_path):
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    recipe = LoraRecipe(lr=1e-3, epochs=1, batch_size=4, lora_r=4, lora_alpha=8)
    train_lora(str(tiny_dir), chat_records(4), tmp_path / "w", recipe, progress=False)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_subset_and_order_are_seeded():
    a = draw_subset(2000, 0.05, 0)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, draw_subset(2000, 0.05, 0))
    assert not np.array_equal(a, draw_subset(2000, 0.05, 1))
    assert len(draw_subset(10, 0.01, 0)) == 1  # never empty
    assert np.array_equal(epoch_order(10, 3, 1), epoch_order(10, 3, 1))
    assert not np.array_equal(epoch_order(10, 3, 0), epoch_order(10, 3, 1))


def test_warmup_trains_on_the_seeded_subset_and_is_cached(tiny_dir, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(r.raw.decode() + "\n" for r in chat_records(20)))
    recipe = LoraRecipe(lr=1e-3, epochs=1, batch_size=4, lora_r=4, lora_alpha=8)
    res = warmup(pool, tmp_path / "w", str(tiny_dir), fraction=0.25, seed=3, recipe=recipe, progress=False)
    want = draw_subset(20, 0.25, 3)
    assert list(res.subset_indices) == want.tolist()
    assert list(res.subset_ids) == [f"r{i}" for i in want]
    saved = json.loads((tmp_path / "w" / "warmup.json").read_text())
    assert saved["subset"]["ids"] == list(res.subset_ids) and saved["recipe"]["lr"] == 1e-3
    assert len(saved["losses"]) == 2
    again = warmup(pool, tmp_path / "w", str(tiny_dir), fraction=0.25, seed=3, recipe=recipe, progress=False,
                   on_step=lambda s, _r: pytest.fail("warmup ran twice"))
    assert again.train.cached and again.subset_ids == res.subset_ids


def test_checkpoint_weights_are_learning_rate_over_sum(tmp_path):
    ck = [Checkpoint(tmp_path / f"step-{i:06d}", i, float(i), lr, 1.0, 0) for i, lr in
          [(1, 3e-5), (2, 1e-5), (3, 0.0)]]
    assert checkpoint_weights(ck) == pytest.approx([0.75, 0.25, 0.0])
    zero = [Checkpoint(tmp_path / "a", 1, 1.0, 0.0, 1.0, 0), Checkpoint(tmp_path / "b", 2, 2.0, 0.0, 1.0, 0)]
    assert checkpoint_weights(zero) == pytest.approx([0.5, 0.5])


def test_aggregate_scores_is_the_weighted_sum_and_keeps_minus_inf():
    import pyarrow as pa

    def table(scores):
        s = np.asarray(scores, dtype=np.float64)
        return pa.table({"index": np.arange(len(s)), "id": [str(i) for i in range(len(s))], "score": s,
                         "mean": s, "max": s, "coverage": s})

    agg = aggregate_scores([table([1.0, 2.0, -np.inf]), table([3.0, 0.0, -np.inf])], [0.25, 0.75])
    assert agg.column("score").to_pylist() == [2.5, 0.5, -np.inf]
    with pytest.raises(ValueError):
        aggregate_scores([table([1.0]), table([1.0, 2.0])], [0.5, 0.5])


def test_choose_checkpoints_by_name(tiny_dir, tmp_path):
    recipe = LoraRecipe(lr=1e-3, epochs=3, batch_size=4, lora_r=4, lora_alpha=8)
    train_lora(str(tiny_dir), chat_records(4), tmp_path / "w", recipe, progress=False)
    assert [c.step for c in choose_checkpoints(tmp_path / "w", "last")] == [3]
    assert [c.step for c in choose_checkpoints(tmp_path / "w", "all")] == [1, 2, 3]
    assert [c.step for c in choose_checkpoints(tmp_path / "w", "step-000002,1")] == [1, 2]
    with pytest.raises(ValueError, match="step-000001, step-000002, step-000003"):
        choose_checkpoints(tmp_path / "w", "step-9")
