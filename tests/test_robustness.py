"""Bad input, interruption, determinism and out-of-memory back-off (issue #7)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trim_select.config import RenderConfig
from trim_select.data import DataError, Message, ReadStats, Renderer, load_records, read_records

BROKEN = Path(__file__).parent / "data" / "broken"
EXPECTED = json.loads((BROKEN / "expected.json").read_text())


# -- a corpus of broken files -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_file_stops_with_file_line_and_field(name):
    want = EXPECTED[name]
    if want is None:
        assert load_records(BROKEN / name)  # tolerated input reads cleanly
        return
    with pytest.raises(DataError) as exc:
        load_records(BROKEN / name)
    assert exc.value.line == want["line"]
    assert exc.value.field == want["field"]
    assert want["reason"] in exc.value.reason
    assert name in str(exc.value)


@pytest.mark.parametrize("name", sorted(n for n, w in EXPECTED.items() if w))
def test_skip_invalid_accounts_for_every_row_of_a_broken_file(name):
    stats, rejected = ReadStats(), []
    recs = list(read_records(BROKEN / name, skip_invalid=True, stats=stats,
                             on_reject=lambda e, raw, i: rejected.append(i)))
    assert stats.rows == len(recs) + len(rejected) == stats.records + stats.rejected
    assert stats.rejected >= 1
    assert sorted([r.index for r in recs] + rejected) == list(range(stats.rows))


# -- property-based: parser and renderer --------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
row_like = st.fixed_dictionaries({}, optional={
    "messages": st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "x", 3]),
                                                             "content": json_values}), max_size=4) | json_values,
    "prompt": json_values, "response": json_values, "text": json_values, "instruction": json_values,
    "output": json_values, "conversations": json_values, "id": json_values,
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row_like | json_values, min_size=1, max_size=5))
def test_reader_either_yields_valid_records_or_raises_data_error(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("h") / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = ReadStats()
    try:
        recs = list(read_records(path, stats=stats))
    except DataError as exc:
        assert exc.line is not None and 1 <= exc.line <= len(rows)
        return
    for r in recs:
        assert r.messages and all(isinstance(m.content, str) and m.content.strip() for m in r.messages)
    skipped = list(read_records(path, skip_invalid=True, stats=(s2 := ReadStats())))
    assert len(skipped) == len(recs) and s2.rejected == 0


@pytest.fixture(scope="module")
def tok():
    from trim_select.testing import make_tokenizer

    return make_tokenizer()


content = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: s.strip() and "<|" not in s)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=content, answer=content, scope=st.sampled_from(["all", "prompt", "response"]),
       max_length=st.integers(4, 64))
def test_rendered_scope_covers_its_content_and_masks_align(tok, user, answer, scope, max_length):
    msgs = [Message("user", user), Message("assistant", answer)]
    full = Renderer(tok, RenderConfig(scope=scope, score_template=False)).render(msgs)
    assert full.input_ids.shape == full.scope_mask.shape == full.special_mask.shape
    assert not (full.scope_mask & full.special_mask).any()
    text = tok.decode(full.input_ids[full.scope_mask])
    want = {"all": [user, answer], "prompt": [user], "response": [answer]}[scope]
    for part in want:
        assert part.strip() in text
    cut = Renderer(tok, RenderConfig(scope=scope, score_template=False, max_length=max_length)).render(msgs)
    assert len(cut) == min(len(full), max_length)
    assert cut.n_truncated == len(full) - len(cut)


# -- interruption --------------------------------------------------------------------------------


def _pool(tmp_path: Path, n: int) -> tuple[Path, Path]:
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"How many clips did Natalia sell {i} times?",
                                        "response": f"She sold {i * 7} clips. #### {i * 7}"}) + "\n"
                            for i in range(n)))
    targets = tmp_path / "targets.jsonl"
    targets.write_text(json.dumps({"prompt": "How many clips did Natalia sell?", "response": "72 clips. #### 72"})
                       + "\n")
    return pool, targets


def _cmd(tiny_dir, pool, targets, out):
    return [sys.executable, "-m", "trim_select.cli", "select", "--pool", str(pool), "--targets", str(targets),
            "--budget", "10%", "--out", str(out), "--model", str(tiny_dir), "--dtype", "float32",
            "--chunk-size", "2", "--batch-tokens", "64", "--quiet"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    pool, targets = _pool(tmp, 80)
    subprocess.run(_cmd(tiny_dir, pool, targets, tmp / "ref"), check=True, env=ENV, capture_output=True)
    return pool, targets, tmp / "ref"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_dir, tmp_path, uninterrupted, sig):
    pool, targets, ref = uninterrupted
    env = ENV
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(tiny_dir, pool, targets, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("part-*.parquet"))) < 3:
        time.sleep(0.001)
    # freeze it first: on an idle machine the tiny model scores the remaining chunks within one
    # polling interval, so the signal would otherwise race the end of the run
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=60)
    done_before = len(list((out / "parts").glob("part-*.parquet")))
    assert not (out / "scores.parquet").exists() and done_before < 40, \
        f"the run went on to {done_before} of 40 parts after {sig.name} (rc {proc.returncode})"
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    assert done_before >= 3
    assert not list(out.rglob("*.tmp")) or sig == signal.SIGKILL  # clean exits leave no temp file
    lock = out / ".trim-select.lock"
    assert lock.exists() == (sig == signal.SIGKILL)  # released on Ctrl-C/SIGTERM, left behind by kill -9
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "parts").glob("part-*.parquet")}

    rerun = subprocess.run(_cmd(tiny_dir, pool, targets, out), check=True, env=env, capture_output=True, text=True)
    if sig == signal.SIGKILL:  # the dead process's lock is taken over, not a reason to stop
        assert "stale lock" in rerun.stderr and str(proc.pid) in rerun.stderr
    assert not lock.exists()
    assert pq.read_table(out / "scores.parquet").equals(pq.read_table(ref / "scores.parquet"))
    assert (out / "coreset.jsonl").read_bytes() == (ref / "coreset.jsonl").read_bytes()
    # the parts finished before the kill were reused, not recomputed: same files, and only the rest scored
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "parts").glob("part-*.parquet")}
    assert {k: after[k] for k in before} == before
    run = json.loads((out / "run.json").read_text())
    assert run["read_stats"]["chunks_computed"] == 40 - len(before)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing itself
def test_sigterm_swallowed_by_a_finalizer_still_stops_the_run(tiny_dir, tmp_path, monkeypatch):
    # a signal handler's KeyboardInterrupt raised inside __del__ is printed and dropped by CPython;
    # pyarrow's ParquetWriter.__del__ runs after every part, so SIGTERM landing there used to be lost
    # and the run finished with exit code 0
    from typer.testing import CliRunner

    from trim_select.cli import app

    pool, targets = _pool(tmp_path, 12)
    out = tmp_path / "out"
    orig, calls = pq.ParquetWriter.__del__, []

    def signal_inside_finalizer(self):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        orig(self)

    monkeypatch.setattr(pq.ParquetWriter, "__del__", signal_inside_finalizer)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    res = CliRunner().invoke(app, _cmd(tiny_dir, pool, targets, out)[3:])
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.output
    assert len(list((out / "parts").glob("part-*.parquet"))) == 3  # the part being written is kept
    assert not (out / "scores.parquet").exists() and not (out / ".trim-select.lock").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored


# -- determinism and resources -------------------------------------------------------------------


def test_same_inputs_give_identical_scores_and_coreset_order(tiny, tmp_path):
    from trim_select.selector import TrimSelector

    pool, targets = _pool(tmp_path, 30)
    outs = []
    for k in range(2):
        sel = TrimSelector(tiny, progress=False)
        sel.run(pool, tmp_path / f"o{k}", "20%", targets=targets)
        outs.append(tmp_path / f"o{k}")
    assert pq.read_table(outs[0] / "scores.parquet").equals(pq.read_table(outs[1] / "scores.parquet"))
    assert (outs[0] / "coreset.jsonl").read_bytes() == (outs[1] / "coreset.jsonl").read_bytes()


def test_ties_are_broken_by_the_lower_pool_index():
    from trim_select.selection import select_top

    s = np.array([0.5, 0.9, 0.5, 0.9, -np.inf, 0.5])
    assert select_top(s, 4).tolist() == [1, 3, 0, 2]
    assert select_top(s, 6).tolist() == [1, 3, 0, 2, 5]  # -inf is never selected


def test_out_of_memory_halves_the_batch_and_gives_the_same_scores(tiny, monkeypatch):
    from trim_select import build_fingerprints, score
    from trim_select.scoring import Scorer

    seqs = [Renderer(tiny.tokenizer).render([Message("user", f"question {i} about clips"),
                                             Message("assistant", f"answer {i}")]) for i in range(9)]
    fp = build_fingerprints(tiny.model, seqs[:2], layers=2)
    want = score(tiny.model, seqs, fp)
    orig = Scorer.forward_hidden
    sizes = []

    def flaky(self, batch):
        sizes.append(batch["input_ids"].shape[0])
        if batch["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return orig(self, batch)

    monkeypatch.setattr(Scorer, "forward_hidden", flaky)
    got = score(tiny.model, seqs, fp)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert max(sizes) == 9 and sizes[-1] <= 2


def test_skip_invalid_run_writes_rejected_rows_and_counts_them(tiny, tmp_path):
    from trim_select.selector import TrimSelector

    pool, targets = _pool(tmp_path, 10)
    with open(pool, "ab") as fh:
        fh.write(b'{"prompt": "broken\n{"prompt": "q", "response": ""}\n\xff\n')
    with pytest.raises(DataError, match="line 11"):
        TrimSelector(tiny, progress=False).run(pool, tmp_path / "strict", "2", targets=targets)
    report = TrimSelector(tiny, progress=False).run(pool, tmp_path / "o", "2", targets=targets, skip_invalid=True)
    assert report["counts"]["rejected"] == 3 and report["counts"]["scored"] == 10
    rejected = [json.loads(line) for line in (tmp_path / "o" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejected] == [(11, None), (12, "response"), (13, None)]
    assert "malformed JSON" in rejected[0]["reason"] and "UTF-8" in rejected[2]["reason"]


def test_models_are_loaded_offline_without_remote_code(tiny_dir, monkeypatch):
    import transformers

    from trim_select.models import load_model

    seen = {}
    orig = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return orig(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_dir), device="cpu", dtype="float32")
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True
    with pytest.raises(FileNotFoundError, match="no hub downloads"):
        load_model("HuggingFaceTB/SmolLM2-135M")
