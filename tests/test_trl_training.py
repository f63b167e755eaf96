"""LoRA SFT through TRL (training/trl_sft.py): same loss tokens, loss, checkpoints and resume as our loop."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import trl
from samples import adapter_tensors, chat_records, train_interrupted
from transformers.trainer_pt_utils import safe_globals

from trim_select.batching import collate
from trim_select.models import load_causal_lm, load_tokenizer
from trim_select.training.checkpoints import list_checkpoints, load_optimizer_state
from trim_select.training.labels import epoch_order, label_loss_sum
from trim_select.training.lora import LoraRecipe, train_lora, training_data
from trim_select.training.trl_sft import HF_DIR, micro_batch_rows, step_order, train_lora_trl

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# dropout on, mid-epoch checkpoints, a partial last step per epoch (8 rows, batch 3): 9 steps, saves at 2,4,6,8,9
RECIPE = LoraRecipe(lr=5e-3, epochs=3, batch_size=3, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                    warmup_ratio=0.2, save_steps=2, device="cpu")  # float32: exact comparisons


def _assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def test_first_step_loss_is_the_mean_over_the_steps_response_tokens(tiny_dir, tmp_path):
    records = chat_records(8)
    recipe = replace(RECIPE, epochs=1)
    trl_run = train_lora_trl(str(tiny_dir), records, tmp_path / "trl", recipe, progress=False)
    ours = train_lora(str(tiny_dir), records, tmp_path / "ours", recipe, progress=False)
    # oracle: LoRA B starts at zero, so step 1 is the base model's loss on the step's label tokens
    net = load_causal_lm(tiny_dir).eval()
    seqs, n_labels, _ = training_data(load_tokenizer(tiny_dir), records, recipe)
    idx = epoch_order(len(seqs), recipe.seed, 0)[:recipe.batch_size]
    with torch.no_grad():
        sums = [float(label_loss_sum(net, collate([seqs[i]], torch.device("cpu")))) for i in idx]
    token_mean = sum(sums) / float(n_labels[idx].sum())
    mean_of_means = float(np.mean([s / n_labels[i] for s, i in zip(sums, idx, strict=True)]))
    assert abs(token_mean - mean_of_means) > 1e-3  # the normalisation is visible on these rows
    assert trl_run.history[0]["loss"] == pytest.approx(token_mean, abs=1e-5)
    assert trl_run.history[0]["loss"] == pytest.approx(ours.history[0]["loss"], abs=1e-5)
    assert trl_run.history[0]["label_tokens"] == ours.history[0]["label_tokens"]


def test_trl_run_reproduces_our_loop(tiny_dir, tmp_path):
    # same rows per step, same dropout draws, same AdamW + schedule: the same trajectory to float rounding
    records = chat_records(8)
    ours = train_lora(str(tiny_dir), records, tmp_path / "ours", RECIPE, progress=False)
    res = train_lora_trl(str(tiny_dir), records, tmp_path / "trl", RECIPE, progress=False)
    assert [h["lr"] for h in res.history] == pytest.approx([h["lr"] for h in ours.history], rel=1e-12)
    assert res.losses == pytest.approx(ours.losses, abs=1e-5)
    assert [h["tokens"] for h in res.history] == [h["tokens"] for h in ours.history]
    assert [h["grad_norm"] for h in res.history] == pytest.approx([h["grad_norm"] for h in ours.history],
                                                                  rel=1e-4)
    _assert_same_adapter(adapter_tensors(ours.final), adapter_tensors(res.final), atol=1e-5)
    assert [c.name for c in res.checkpoints] == [c.name for c in ours.checkpoints]


def test_only_assistant_tokens_carry_labels(tiny_dir, tmp_path, monkeypatch):
    seen: list[tuple[list[int], list[int]]] = []
    original = trl.SFTTrainer.training_step

    def spy(self, model, inputs, *a, **kw):
        seen.append((inputs["input_ids"][0].tolist(), inputs["labels"][0].tolist()))
        return original(self, model, inputs, *a, **kw)

    monkeypatch.setattr(trl.SFTTrainer, "training_step", spy)
    records = chat_records(4)
    recipe = replace(RECIPE, epochs=1, batch_size=2)
    train_lora_trl(str(tiny_dir), records, tmp_path / "w", recipe, progress=False)
    tok = load_tokenizer(tiny_dir)
    seqs, _, _ = training_data(tok, records, recipe)
    by_ids = {tuple(s.input_ids.tolist()): (s, r) for s, r in zip(seqs, records, strict=True)}
    assert len(seen) == 4 and len({tuple(ids) for ids, _ in seen}) == 4  # every row once, unpadded
    for ids, labels in seen:
        seq, record = by_ids[tuple(ids)]
        labelled = np.array([lab != -100 for lab in labels])
        np.testing.assert_array_equal(labelled, seq.scope_mask)
        assert all(lab == i for lab, i in zip(labels, ids, strict=True) if lab != -100)
        text = tok.decode([i for i, m in zip(ids, labelled, strict=True) if m], skip_special_tokens=True)
        assert text.strip() == record.messages[1].content.strip()  # the answer, nothing of the prompt
        # plus exactly one special token: the end-of-turn right after the answer (train_eos)
        assert int((labelled & seq.special_mask).sum()) == 1


def test_step_order_is_the_epoch_order_longest_first_within_each_step():
    lengths = np.array([5, 9, 1, 7, 3, 8, 2])
    got = step_order(lengths, seed=3, epoch=1, batch_size=3)
    order = epoch_order(7, 3, 1)
    for k in range(0, 7, 3):
        step = order[k:k + 3]
        assert sorted(got[k:k + 3].tolist()) == sorted(step.tolist())
        assert list(lengths[got[k:k + 3]]) == sorted(lengths[step].tolist(), reverse=True)


def test_checkpoints_load_without_unpickling_and_moments_are_keyed_like_ours(tiny_dir, tmp_path):
    records = chat_records(6)
    recipe = replace(RECIPE, epochs=2, save_steps=0)
    res = train_lora_trl(str(tiny_dir), records, tmp_path / "trl", recipe, progress=False)
    ours = train_lora(str(tiny_dir), records, tmp_path / "ours", recipe, progress=False)
    ckpts = list_checkpoints(tmp_path / "trl")
    assert [c.name for c in ckpts] == ["step-000002", "step-000004"]  # one per epoch, as train_lora
    assert not (tmp_path / "trl" / HF_DIR).exists()  # the Trainer's pickled folders are gone
    pickles = [p for p in (tmp_path / "trl").rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    assert pickles == []
    ref = load_optimizer_state(list_checkpoints(tmp_path / "ours")[-1].path)
    for c in ckpts:
        moments = load_optimizer_state(c.path)
        assert set(moments) == set(adapter_tensors(c.path)) == set(ref)
        assert all(set(m) == {"exp_avg", "exp_avg_sq"} for m in moments.values())
        state = json.loads((c.path / "state.json").read_text())
        seg = [h["lr"] for h in state["history"]][c.step - 2:c.step]
        assert state["learning_rate"] == pytest.approx(np.mean(seg))  # LESS's checkpoint weight
    last = load_optimizer_state(ckpts[-1].path)
    for k in ref:  # the moments themselves agree with our loop's
        torch.testing.assert_close(last[k]["exp_avg"], ref[k]["exp_avg"], rtol=1e-3, atol=1e-8)
    assert {p.name for p in res.final.iterdir()} == {p.name for p in ours.final.iterdir()}
    summary = json.loads((tmp_path / "trl" / "train.json").read_text())
    assert summary["backend"] == "trl" and len(summary["losses"]) == 4


def test_kill_and_resume_gives_the_identical_final_adapter(tiny_dir, tmp_path):
    records = chat_records(8)
    ref = train_lora_trl(str(tiny_dir), records, tmp_path / "ref", RECIPE, progress=False)

    train_interrupted(train_lora_trl, str(tiny_dir), records, tmp_path / "cut", RECIPE, progress=False, at=5)
    assert not (tmp_path / "cut" / "final").exists()
    assert list_checkpoints(tmp_path / "cut")[-1].step == 4
    hf = tmp_path / "cut" / HF_DIR
    assert sorted(p.name for p in hf.glob("checkpoint-*")) == ["checkpoint-4"]  # older ones pruned
    for f in ("optimizer.pt", "scheduler.pt"):  # what resume reads, through torch's weights-only loader
        torch.load(hf / "checkpoint-4" / f, weights_only=True)
    with safe_globals():  # the numpy RNG state: weights-only too, with numpy's array types allowed (as HF)
        torch.load(hf / "checkpoint-4" / "rng_state.pth", weights_only=True)
    seen: list[int] = []
    res = train_lora_trl(str(tiny_dir), records, tmp_path / "cut", RECIPE, progress=False,
                         on_step=lambda s, _r: seen.append(s))
    assert seen == [5, 6, 7, 8, 9]  # continued from step 4
    a, b = adapter_tensors(ref.final), adapter_tensors(res.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.losses == ref.losses
    again = train_lora_trl(str(tiny_dir), records, tmp_path / "cut", RECIPE, progress=False,
                           on_step=lambda s, _r: pytest.fail("retrained a finished run"))
    assert again.cached


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_dir, tmp_path):
    records = chat_records(6)
    recipe = replace(RECIPE, epochs=1)
    one = adapter_tensors(train_lora_trl(str(tiny_dir), records, tmp_path / "a", recipe, progress=False).final)
    two = adapter_tensors(train_lora_trl(str(tiny_dir), records, tmp_path / "b", recipe, progress=False).final)
    other = adapter_tensors(train_lora_trl(str(tiny_dir), records, tmp_path / "c", replace(recipe, seed=1),
                                    progress=False).final)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.allclose(one[k], other[k]) for k in one)


def test_leaves_global_rngs_and_refuses_a_folder_of_the_other_backend(tiny_dir, tmp_path):
    recipe = replace(RECIPE, epochs=1)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    train_lora_trl(str(tiny_dir), chat_records(4), tmp_path / "w", recipe, progress=False)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    train_lora(str(tiny_dir), chat_records(4), tmp_path / "ours", recipe, progress=False)
    with pytest.raises(RuntimeError, match="different settings"):
        train_lora_trl(str(tiny_dir), chat_records(4), tmp_path / "ours", recipe, progress=False)
    res = train_lora_trl(str(tiny_dir), chat_records(4), tmp_path / "ours", recipe, progress=False, overwrite=True)
    assert not res.cached and json.loads((res.out_dir / "train.json").read_text())["backend"] == "trl"


def test_micro_batch_rows_accumulate_to_the_recipe_batch():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert micro_batch_rows(LoraRecipe(), cpu) == 1  # no padding on CPU, as train_lora
    assert micro_batch_rows(LoraRecipe(), gpu) == 2  # Table 7: 4096 tokens // 2048 = 2 rows, x32 accumulation
    assert micro_batch_rows(LoraRecipe(batch_size=6, micro_batch_size=4), cpu) == 3  # largest divisor <= 4
    assert micro_batch_rows(LoraRecipe(batch_size=8, micro_batch_tokens=1 << 20), gpu) == 8


def test_gradient_checkpointing_leaves_the_update_unchanged(tiny_dir, tmp_path):
    recipe = replace(RECIPE, epochs=1)
    plain = train_lora_trl(str(tiny_dir), chat_records(6), tmp_path / "a", recipe, progress=False)
    ckpt = train_lora_trl(str(tiny_dir), chat_records(6), tmp_path / "b", replace(recipe, gradient_checkpointing=True),
                          progress=False)
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-6)
    _assert_same_adapter(adapter_tensors(plain.final), adapter_tensors(ckpt.final), atol=1e-6)


def test_bf16_autocast_follows_our_loop(tiny_dir, tmp_path):
    # recipe dtype bf16: the Trainer's bf16=True autocasts on CPU too (float32 weights), like train_lora
    recipe = replace(RECIPE, epochs=1, dtype="bf16")
    ours = train_lora(str(tiny_dir), chat_records(6), tmp_path / "ours", recipe, progress=False)
    res = train_lora_trl(str(tiny_dir), chat_records(6), tmp_path / "trl", recipe, progress=False)
    fp32 = train_lora_trl(str(tiny_dir), chat_records(6), tmp_path / "fp32", replace(recipe, dtype="float32"),
                          progress=False)
    assert res.losses == pytest.approx(ours.losses, abs=2e-4)
    assert max(abs(a - b) for a, b in zip(res.losses, fp32.losses, strict=True)) > 1e-5  # autocast is on
    assert json.loads((res.out_dir / "train.json").read_text())["autocast_dtype"] == "bfloat16"
