"""`danlu eval`: a zero model scores ln(V) per token exactly; windows score every token once and
equal documents scored one by one; --packed equals the train loop's eval loss; the command."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain.config import ModelConfig, load_config
from danlu.evaluate import evaluate
from pretrain.evaluate import pack_windows
from pretrain.generate import load_checkpoint
from pretrain.hf import write_run

M = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, init_std=0.2)


def init_params(m: ModelConfig, seed: int = 0) -> dict:
    from flax import nnx

    from pretrain.model import init_model

    return jax.jit(lambda: nnx.to_pure_dict(nnx.state(init_model(m, seed))))()


def make_run(path, params, shards, *extra) -> None:
    cfg = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in vars(M).items()]
                      + ["data.seq_len=32", f"data.path={shards}", *extra])
    write_run(path, cfg, params)


def test_pack_windows_predicts_every_token_once():
    docs = [[5, 6, 7], list(range(10, 23)), [40], [41, 42, 43, 44, 45, 46, 47, 48]]
    batches = list(pack_windows(iter(docs), eos_id=3, seq_len=8, rows_per_batch=2))
    targets, pairs = [], []
    for b in batches:
        for r in range(2):
            for c in range(8):
                if b["segment_ids"][r, c]:
                    targets.append(int(b["targets"][r, c]))
                    pairs.append((int(b["inputs"][r, c]), int(b["targets"][r, c])))
                    if b["positions"][r, c] == 0:  # a window starts: its segment id is new
                        assert c == 0 or b["segment_ids"][r, c] != b["segment_ids"][r, c - 1]
    assert targets == [t for d in docs for t in d]
    # the input before each token is the previous token of its document, or EOS for the first
    expected = [(([3] + d)[i], d[i]) for d in docs for i in range(len(d))]
    assert pairs == expected


def test_zero_model_scores_ln_vocab(shards, tmp_path):
    """All-zero weights: uniform next-token distribution, loss = ln(V) exactly, on shards and JSONL."""
    zeros = jax.tree.map(jnp.zeros_like, init_params(M))
    make_run(tmp_path / "run", zeros, shards)
    ckpt = load_checkpoint(tmp_path / "run")
    texts = ["hello world, this is a test.\n", "def f(x):\n    return x * 2  # ünïcödé", "a" * 300]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    result = evaluate(ckpt, [str(shards), str(tmp_path / "docs.jsonl")], batch_size=4)
    for path, r in result["inputs"].items():
        assert r["loss"] == pytest.approx(math.log(512), rel=1e-6), path
        assert r["perplexity"] == pytest.approx(512, rel=1e-5)
        assert r["bits_per_byte"] == pytest.approx(r["tokens"] * math.log2(512) / r["bytes"], rel=1e-6)
    jsonl = result["inputs"][str(tmp_path / "docs.jsonl")]
    assert jsonl["bytes"] == sum(len(t.encode()) for t in texts)
    assert jsonl["documents"] == 3
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(shards / "tokenizer.model"))
    assert jsonl["tokens"] == sum(len(sp.encode(t)) for t in texts)


def test_windows_equal_documents_scored_one_by_one(shards, tmp_path):
    from flax import nnx

    from pretrain.loss import cross_entropy
    from pretrain.model import init_model
    from pretrain.train import merge_model

    params = init_params(M, 1)
    make_run(tmp_path / "run", params, shards)
    ckpt = load_checkpoint(tmp_path / "run")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(shards / "tokenizer.model"))
    texts = ["short one", "x = [i * i for i in range(10)]\nprint(x)\n" * 3, "tiny"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    got = evaluate(ckpt, [str(tmp_path / "docs.jsonl")], seq_len=16, batch_size=2)["total"]

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(M, 0)))

    @jax.jit
    def doc_nats(params, inputs, targets):
        model = merge_model(graphdef, abstract, params)
        return cross_entropy(model(inputs), model.unembedding(), targets, jnp.ones_like(targets, bool))[0]

    nats, tokens = 0.0, 0
    for text in texts:
        stream = [sp.eos_id()] + sp.encode(text)
        for a in range(0, len(stream) - 1, 16):  # windows of 16 predictions, each on its own
            inputs, targets = np.asarray([stream[a:a + 16]]), np.asarray([stream[a + 1:a + 17]])
            inputs = inputs[:, :targets.shape[1]]
            nats, tokens = nats + float(doc_nats(params, inputs, targets)), tokens + targets.size
    assert len(sp.encode(texts[1])) > 16  # the long document really is windowed
    assert got["tokens"] == tokens
    assert got["loss"] == pytest.approx(nats / tokens, rel=1e-5)


def test_packed_equals_train_eval_loss_and_command(shards, tmp_path, capsys):
    from danlu.cli import main
    from pretrain.train import train

    run = tmp_path / "run"
    make_run(run, init_params(M, 2), shards, "train.steps=2", "train.global_batch_size=8",
             "optimizer.warmup_steps=0", "data.eval_batches=2", "logging.tensorboard=false", f"train.run_dir={run}")
    summary = train(load_config(run / "config.yaml"), log=lambda _: None)
    ckpt = load_checkpoint(run)
    assert ckpt.step == 2
    packed = evaluate(ckpt, [str(shards)], packed=True)["total"]
    assert packed["loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)

    assert main(["eval", str(run), "--data", str(shards), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint_step"] == 2 and out["total"]["tokens"] > 0 and out["total"]["bits_per_byte"] > 0
    assert main(["eval", str(run), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "ok"}\n{"id": "b"}\n{broken\n')
    assert main(["eval", str(run), "--data", str(tmp_path / "bad.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["errors"] == 2  # skipped and counted, not a crash
    assert main(["eval", str(run), "--data", str(tmp_path / "bad.jsonl")]) == 0
    assert "1 documents, 2 bad records skipped" in capsys.readouterr().out
