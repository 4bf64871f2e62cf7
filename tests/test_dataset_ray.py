"""``explain_dataset`` on a local Ray (2 CPUs): exactly-once output, resume, the command line, faults.

Ray starts once for this module and is shut down after it. The fault test (``-m slow``) kills a
worker's process mid-run and checks that Ray replaced it and that every row is there once, with
the values of a direct ``mambalrp.explain``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import pytest
import torch

import mambalrp

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from mambalrp.dataset_cli import add_parser, run  # noqa: E402
from mambalrp.dataset_rows import Tokens  # noqa: E402
from mambalrp.models.zoo import load_model  # noqa: E402

WORDS = "a the film movie plot acting is was witty dull gorgeous flat charming boring , . and but not so".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic sentences of 3 to 14 words."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 15, (n,), generator=g).tolist()
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)) for k in lengths]


def _recording_loader(directory: str, delay: float = 0.0):
    """A loader that records the PID of the process loading the model (a worker).

    With ``delay``, every forward of the model first sleeps that long, so that a run lasts long
    enough for Ray to restart a killed worker before the end.
    """

    def load():
        import time

        from mambalrp.models.zoo import load_model

        open(os.path.join(directory, str(os.getpid())), "w").close()
        model, tok = load_model("sst-mamba1")
        if delay:
            model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
        return model, tok

    return load


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    temp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp), logging_level="ERROR",
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def sst():
    return load_model("sst-mamba1")


def _rows(directory) -> list[dict]:
    return pq.read_table(directory).to_pylist()  # pyarrow skips the _manifest


def _assert_matches_explain(rows, texts, sst, count=4):
    model, tok = sst
    for row in [r for r in rows if r["error"] is None][:count]:
        text = texts[row["row_id"]]
        assert row["text"] == text
        exp = mambalrp.explain(model, torch.tensor([tok.encode(text).ids]))
        torch.testing.assert_close(torch.tensor(row["relevance"]), exp.relevance[0], atol=1e-5, rtol=1e-4)
        assert row["logit"] == pytest.approx(float(exp.logit[0]), abs=1e-5)


def test_exactly_once_and_resume(local_ray, sst, tmp_path):
    texts = _texts(22) + ["", "x " * 80]
    out_dir = tmp_path / "out"
    shards = []
    result = mambalrp.explain_dataset(
        "sst-mamba1", texts, output=out_dir, batch_size=4, shard_size=6, workers=2, max_length=64, progress=shards.append
    )
    rows = _rows(out_dir)
    assert sorted(r["row_id"] for r in rows) == list(range(len(texts)))  # every row once
    assert result.count() == len(texts)
    assert len(shards) == 4 and sum(s["rows"] for s in shards) == len(texts)
    assert 1 <= len({s["worker_pid"] for s in shards}) <= 2  # at most two actors (one model each)
    errors = {r["row_id"]: r["error"] for r in rows if r["error"] is not None}
    too_long = len(Tokens(sst[1]).encode(texts[23])[0])  # the zoo tokenizer itself truncates at 64
    assert errors == {22: "empty text", 23: f"too long: {too_long} tokens, over max_length=64"} and too_long > 64
    _assert_matches_explain(rows, texts, sst)

    # A rerun into the same output does no work and returns the same rows; other settings are refused.
    again = []
    result = mambalrp.explain_dataset(
        "sst-mamba1", texts, output=out_dir, batch_size=4, shard_size=6, max_length=64, progress=again.append
    )
    assert again == [] and sorted(result.to_pandas()["row_id"]) == list(range(len(texts)))
    with pytest.raises(mambalrp.InputError, match="max_length differ"):
        mambalrp.explain_dataset("sst-mamba1", texts, output=out_dir, batch_size=4, shard_size=6, max_length=32)


@pytest.mark.slow
def test_resume_redoes_only_the_missing_shards(local_ray, sst, tmp_path):
    texts = _texts(16, seed=4)
    out_dir = tmp_path / "out"
    mambalrp.explain_dataset("sst-mamba1", texts, output=out_dir, batch_size=4, shard_size=4, workers=1, progress=False)
    lost = sorted(out_dir.glob("part-*.parquet"))[1:3]
    lost_ids = sorted(i for p in lost for i in pq.read_table(p, columns=["row_id"]).column("row_id").to_pylist())
    for p in lost:
        p.unlink()
    again = []
    mambalrp.explain_dataset("sst-mamba1", texts, output=out_dir, batch_size=4, shard_size=4, progress=again.append)
    assert len(lost_ids) == 8 and sorted(i for s in again for i in _ids(out_dir / s["file"])) == lost_ids
    rows = _rows(out_dir)
    assert sorted(r["row_id"] for r in rows) == list(range(len(texts)))
    _assert_matches_explain([r for r in rows if r["row_id"] in lost_ids], texts, sst)


def _ids(path) -> list[int]:
    return pq.read_table(path, columns=["row_id"]).column("row_id").to_pylist()


@pytest.mark.slow
def test_command_line_in_process(local_ray, sst, tmp_path):
    texts = _texts(10, seed=1)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(f'{{"text": "{t}", "gold": "{"positive" if i % 2 else "negative"}"}}\n' for i, t in enumerate(texts)))
    parser = argparse.ArgumentParser(prog="mambalrp")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain-dataset", "--model", "sst-mamba1", "--data", str(data), "--out", str(tmp_path / "o"),
                              "--target", "gold", "--batch-size", "8", "--workers", "1", "--quiet"])
    assert run(args) == 0
    rows = _rows(tmp_path / "o")
    assert sorted(r["row_id"] for r in rows) == list(range(10))
    assert all(r["target_label"] == r["gold"] and r["error"] is None for r in rows)
    model, tok = sst
    row = rows[0]
    exp = mambalrp.explain(model, torch.tensor([tok.encode(row["text"]).ids]), row["target"])
    torch.testing.assert_close(torch.tensor(row["relevance"]), exp.relevance[0], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_lazy_dataset_from_a_ray_dataset_written_by_ray(local_ray, sst, tmp_path):
    texts = _texts(12, seed=2)
    source = ray.data.from_items([{"text": t, "n": i} for i, t in enumerate(texts)])
    out = mambalrp.explain_dataset(lambda: load_model("sst-mamba1"), source, batch_size=4, workers=2)
    out.write_parquet(str(tmp_path / "written"))  # Ray's own writer, as a user would
    rows = _rows(tmp_path / "written")
    assert sorted(r["row_id"] for r in rows) == list(range(12))
    assert all(r["n"] == r["row_id"] for r in rows)  # input columns kept, ids in input order
    _assert_matches_explain(rows, texts, sst)


@pytest.mark.slow
def test_a_suite_method_and_a_transformers_tokenizer_in_workers(local_ray, sst, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from benchmarks.faithfulness import methods

    model, tok = sst
    texts = _texts(8, seed=5)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    mambalrp.explain_dataset(lambda: load_model("sst-mamba1")[0], texts, tokenizer=hf, method=methods.saliency,
                             output=tmp_path / "o", batch_size=4, workers=1, progress=False)
    rows = _rows(tmp_path / "o")
    assert sorted(r["row_id"] for r in rows) == list(range(8))
    for row in rows:
        ids = torch.tensor([Tokens(tok).encode(row["text"])[0]])
        assert row["rules"] == "saliency" and row["input_ids"] == ids[0].tolist()
        expected = methods.saliency(model, ids, torch.tensor([row["target"]]))
        torch.testing.assert_close(torch.tensor(row["relevance"]), expected[0], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_killed_worker_is_replaced_and_no_row_is_lost_or_duplicated(local_ray, sst, tmp_path):
    texts = _texts(64, seed=3)
    pids, out_dir = tmp_path / "pids", tmp_path / "out"
    pids.mkdir()
    killed: list[int] = []
    written_at_kill: list[int] = []

    def kill_one_worker_mid_run():
        deadline = time.time() + 300
        while time.time() < deadline and not list(out_dir.glob("part-*.parquet")):
            time.sleep(0.05)
        victim = int(sorted(os.listdir(pids))[0])
        written_at_kill.append(len(list(out_dir.glob("part-*.parquet"))))
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    killer = threading.Thread(target=kill_one_worker_mid_run, daemon=True)
    killer.start()
    shards = []
    mambalrp.explain_dataset(_recording_loader(str(pids), delay=0.5), texts, output=out_dir, batch_size=2, shard_size=2,
                             workers=2, progress=shards.append)
    killer.join(timeout=10)
    assert killed, "no worker was killed"
    assert written_at_kill[0] < 32  # the kill came before the end of the run
    started = {int(p) for p in os.listdir(pids)}
    assert killed[0] in started and len(started) >= 3  # Ray started a replacement actor
    rows = _rows(out_dir)
    assert sorted(r["row_id"] for r in rows) == list(range(len(texts)))  # none lost, none twice
    assert all(r["error"] is None for r in rows)
    assert killed[0] not in {s["worker_pid"] for s in shards[-8:]}
    _assert_matches_explain(rows, texts, sst, count=6)
