"""The grain loader: packing invariants, order, multi-process slices, resume, eval batches."""
import json
import os
import types

import numpy as np
import pytest
from array_record.python import array_record_module

from pretrain import data

EOS = 3
BASE = 1000  # document d, token t has id BASE * (d + 1) + t: every token names its document and offset


def doc_tokens(d, n):
    return np.arange(n, dtype=np.uint32) + BASE * (d + 1)


def write_shards(path, train_lengths, eval_lengths=(), num_train_shards=2, sidecars=True):
    """Hand-made token shards in the `danlu tokenize` layout; returns {split: [doc arrays]}.

    Train document d (and eval document d, numbered after the train ones) holds
    doc_tokens(d, length). Train docs are dealt round-robin over the train shards.
    """
    os.makedirs(path, exist_ok=True)
    docs = {"train": [doc_tokens(d, n) for d, n in enumerate(train_lengths)],
            "eval": [doc_tokens(len(train_lengths) + d, n) for d, n in enumerate(eval_lengths)]}
    groups = {"train": [docs["train"][i::num_train_shards] for i in range(num_train_shards)],
              "eval": [docs["eval"]] if eval_lengths else []}
    shards = []
    for split in ("train", "eval"):
        for i, group in enumerate(groups[split]):
            name = f"{split}-{i:05d}-of-{len(groups[split]):05d}"
            w = array_record_module.ArrayRecordWriter(os.path.join(path, name + ".array_record"), "group_size:1")
            for arr in group:
                w.write(arr.astype("<u4").tobytes())
            w.close()
            entry = {"path": name + ".array_record", "split": split, "documents": len(group),
                     "tokens": int(sum(map(len, group)))}
            if sidecars:
                np.save(os.path.join(path, name + ".lengths.npy"), np.array([len(a) for a in group], "<u4"))
                entry["lengths"] = name + ".lengths.npy"
            shards.append(entry)
    # Stream order of the train split is shard order, so the loader sees train docs in
    # the order of the concatenated groups; return them that way.
    order = {"train": [a for g in groups["train"] for a in g], "eval": docs["eval"]}
    manifest = {"vocab_size": BASE * (len(train_lengths) + len(eval_lengths) + 2), "eos_id": EOS,
                "pad_id": 0, "bos_id": 2, "dtype": "<u4", "eos_appended": False, "shards": shards}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return order


def cfg(path, seq_len=16, shuffle=True, worker_count=0):
    return types.SimpleNamespace(path=str(path), seq_len=seq_len, shuffle=shuffle,
                                 worker_count=worker_count, eval_batches=2)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


LENGTHS = [5, 17, 1, 40, 9, 23, 2, 11, 30, 7, 3, 19]  # 167 tokens + 12 EOS = 179 = 10 rows of 17 + 9


@pytest.fixture()
def shards(tmp_path):
    order = write_shards(tmp_path / "s", LENGTHS, eval_lengths=[6, 4], num_train_shards=3)
    return tmp_path / "s", order


def check_row(inputs, targets, seg, pos):
    """Packing invariants of one row, from the self-describing token ids alone."""
    seq = np.concatenate([inputs, targets[-1:]])
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    doc = np.where(seq == EOS, -1, seq // BASE)
    off = np.where(seq == EOS, -1, seq % BASE)
    # An EOS belongs to the document before it; fill its doc id from the left.
    for t in range(len(seq)):
        if doc[t] == -1 and t > 0:
            doc[t] = doc[t - 1]
    expected_seg, expected_pos = [], []
    s, p = 1, 0
    for t in range(len(inputs)):
        if t > 0:
            new_doc = seq[t - 1] == EOS  # after an EOS comes the next document's first token
            if new_doc:
                assert off[t] == 0, "a document inside a row starts at its first token"
                s, p = s + 1, 0
            else:
                assert doc[t] == doc[t - 1] and (seq[t] == EOS or off[t] == off[t - 1] + 1)
        expected_seg.append(s)
        expected_pos.append(p)
        p += 1
    np.testing.assert_array_equal(seg, expected_seg)
    np.testing.assert_array_equal(pos, expected_pos)


# ----------------------------------------------------------------------------- packing

def test_shapes_dtypes_and_packing_invariants(shards):
    path, _ = shards
    it = data.make_train_iterator(cfg(path), 4, seed=0)
    for batch in take(it, 8):  # 32 rows: more than 3 epochs of 10 rows
        assert set(batch) == set(data.BATCH_KEYS)
        for v in batch.values():
            assert v.shape == (4, 16) and v.dtype == np.int32
        assert batch["segment_ids"].min() >= 1  # never padded
        for r in range(4):
            check_row(*(batch[k][r] for k in data.BATCH_KEYS))


def test_unshuffled_epoch_is_the_stream_cut_in_rows(shards):
    path, order = shards
    stream = np.concatenate([np.append(d, EOS) for d in order["train"]])  # docs in manifest order
    it = data.make_train_iterator(cfg(path, seq_len=16, shuffle=False), 2, seed=0)
    rows = [np.concatenate([b["inputs"][r], b["targets"][r, -1:]]) for b in take(it, 10) for r in range(2)]
    per_epoch = len(stream) // 17
    np.testing.assert_array_equal(np.concatenate(rows[:per_epoch]), stream[:per_epoch * 17])
    np.testing.assert_array_equal(rows[per_epoch], stream[:17])  # epoch 2 starts over
    # Train docs in shard order have lengths 5, 40, ...: row 0 is 5 tokens + EOS, then
    # the 40-token doc's first 10 inputs.
    b0 = data.make_train_iterator(cfg(path, shuffle=False), 2, seed=0).__next__()
    np.testing.assert_array_equal(b0["segment_ids"][0], [1] * 6 + [2] * 10)
    np.testing.assert_array_equal(b0["positions"][0], list(range(6)) + list(range(10)))
    # Row 1 continues that document: fresh segment id, positions from 0.
    np.testing.assert_array_equal(b0["segment_ids"][1][:7], [1] * 7)
    np.testing.assert_array_equal(b0["positions"][1][:7], range(7))


def test_shuffled_epoch_uses_every_token_at_most_once(shards):
    path, order = shards
    it = data.make_train_iterator(cfg(path, seq_len=16), 5, seed=7)
    rows = [np.concatenate([b["inputs"][r], b["targets"][r, -1:]]) for b in take(it, 2) for r in range(5)]
    toks = np.concatenate(rows)  # exactly one epoch: 10 rows
    non_eos = toks[toks != EOS]
    assert len(np.unique(non_eos)) == len(non_eos)
    assert len(toks) == 170 and np.sum(toks == EOS) + len(non_eos) == 170
    assert len(non_eos) >= sum(LENGTHS) - 9  # only the tail shorter than a row is dropped


def test_real_tokenizer_output_packs_into_documents(tmp_path):
    import sentencepiece as spm

    from data_pipeline import tokenize as tok

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "naïve", "中文", "\n    ", "\t", "🙂"]
    docs = [{"id": f"d{i}", "source": "t", "text": " ".join(rng.choice(words, rng.integers(3, 60)))}
            for i in range(40)]
    inp = tmp_path / "d.jsonl"
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    model = tok.train_tokenizer([str(inp)], str(tmp_path / "sp"), vocab_size=300)
    tok.encode_to_shards([str(inp)], str(tmp_path / "out"), model, num_shards=2, eval_fraction=0.1, workers=1)
    sp = spm.SentencePieceProcessor(model_file=model)
    encoded = [sp.encode(d["text"]) + [sp.eos_id()] for d in docs]
    batch = next(data.make_train_iterator(cfg(tmp_path / "out", seq_len=64), 4, seed=0, vocab_size=512))
    for r in range(4):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg):
            ids = batch["inputs"][r][seg == s].tolist()
            # Each segment is a contiguous run of one document's ids (+ its EOS).
            assert any(any(e[i:i + len(ids)] == ids for i in range(len(e) - len(ids) + 1)) for e in encoded)


# ----------------------------------------------------------------------------- order

def test_deterministic_for_a_seed_and_different_for_another(shards):
    path, _ = shards
    a = take(data.make_train_iterator(cfg(path), 4, seed=1), 5)
    b = take(data.make_train_iterator(cfg(path), 4, seed=1), 5)
    c = take(data.make_train_iterator(cfg(path), 4, seed=2), 5)
    assert_batches_equal(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_epochs_are_reshuffled(shards):
    path, _ = shards
    batches = take(data.make_train_iterator(cfg(path), 5, seed=0), 4)  # epochs 0 and 1, 10 rows each
    e0 = np.concatenate([b["inputs"] for b in batches[:2]])
    e1 = np.concatenate([b["inputs"] for b in batches[2:]])
    # Not just the rows in another order: documents are re-permuted, so rows differ.
    assert set(map(tuple, e0.tolist())) != set(map(tuple, e1.tolist()))
    # Unshuffled, every epoch has the same rows.
    flat = take(data.make_train_iterator(cfg(path, shuffle=False), 5, seed=0), 4)
    assert_batches_equal(flat[:2], flat[2:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(shards, process_count):
    path, _ = shards
    whole = take(data.make_train_iterator(cfg(path), 8, seed=3), 4)
    parts = [take(data.make_train_iterator(cfg(path), 8, seed=3, process_index=p,
                                           process_count=process_count), 4)
             for p in range(process_count)]
    for step in range(4):
        for k in data.BATCH_KEYS:
            np.testing.assert_array_equal(
                np.concatenate([parts[p][step][k] for p in range(process_count)]), whole[step][k])
        assert parts[0][step]["inputs"].shape == (8 // process_count, 16)


def test_start_step_equals_skipping(shards):
    path, _ = shards
    full = take(data.make_train_iterator(cfg(path), 4, seed=5), 9)
    late = take(data.make_train_iterator(cfg(path), 4, seed=5, start_step=6), 3)
    assert_batches_equal(full[6:], late)


def test_get_state_set_state_resumes_exactly(shards):
    path, _ = shards
    it = data.make_train_iterator(cfg(path), 4, seed=5)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert state["step"] == 3
    expected = take(it, 4)
    fresh = data.make_train_iterator(cfg(path), 4, seed=5)
    take(fresh, 1)  # state is restored whatever the iterator did before
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)
    other_seed = data.make_train_iterator(cfg(path), 4, seed=6)
    with pytest.raises(ValueError, match="seed=5"):
        other_seed.set_state(state)


def test_grain_checkpoint_handler_roundtrip(shards, tmp_path):
    import grain
    from etils import epath

    path, _ = shards
    it = data.make_train_iterator(cfg(path), 4, seed=0)
    take(it, 2)
    ckpt = epath.Path(tmp_path / "ckpt")
    ckpt.mkdir()
    grain.checkpoint.CheckpointHandler().save(ckpt, it)
    expected = next(it)
    restored = grain.checkpoint.CheckpointHandler().restore(ckpt, data.make_train_iterator(cfg(path), 4, seed=0))
    assert_batches_equal([next(restored)], [expected])


def test_worker_processes_give_the_same_batches(shards):
    path, _ = shards
    serial = take(data.make_train_iterator(cfg(path), 4, seed=9, start_step=2), 3)
    it = data.make_train_iterator(cfg(path, worker_count=2), 4, seed=9, start_step=2)
    try:
        assert_batches_equal(take(it, 3), serial)
    finally:
        it.close()


def test_missing_lengths_sidecar_is_recomputed(tmp_path):
    write_shards(tmp_path / "a", LENGTHS, num_train_shards=2)
    write_shards(tmp_path / "b", LENGTHS, num_train_shards=2, sidecars=False)
    assert_batches_equal(take(data.make_train_iterator(cfg(tmp_path / "a"), 4, seed=0), 3),
                         take(data.make_train_iterator(cfg(tmp_path / "b"), 4, seed=0), 3))


# ----------------------------------------------------------------------------- eval

def test_eval_batches_are_fixed_and_wrap_around(shards):
    path, order = shards
    a = data.make_eval_batches(cfg(path, seq_len=8), 2, 3)
    assert_batches_equal(a, data.make_eval_batches(cfg(path, seq_len=8), 2, 3))
    assert len(a) == 3 and a[0]["inputs"].shape == (2, 8)
    # Eval stream: [6 tokens, EOS, 4 tokens, EOS] = 12 tokens, repeated; rows of 9.
    stream = np.concatenate([np.append(d, EOS) for d in order["eval"]])
    rows = np.concatenate([np.concatenate([b["inputs"][r], b["targets"][r, -1:]]) for b in a for r in range(2)])
    np.testing.assert_array_equal(rows, np.resize(stream, 6 * 9))
    for b in a:
        for r in range(2):
            check_row(*(b[k][r] for k in data.BATCH_KEYS))
    halves = [data.make_eval_batches(cfg(path, seq_len=8), 2, 3, process_index=p, process_count=2) for p in (0, 1)]
    for i in range(3):
        for k in data.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([halves[0][i][k], halves[1][i][k]]), a[i][k])


def test_eval_split_empty_is_an_error(tmp_path):
    write_shards(tmp_path / "s", LENGTHS)
    with pytest.raises(ValueError, match="eval split is empty"):
        data.make_eval_batches(cfg(tmp_path / "s"), 2, 1)


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_problem(shards, tmp_path):
    path, _ = shards
    with pytest.raises(FileNotFoundError, match="no manifest.json in data.path=.*nowhere"):
        data.make_train_iterator(cfg(tmp_path / "nowhere"), 4, seed=0)
    with pytest.raises(ValueError, match="seq_len=500 is longer than the whole train split"):
        data.make_train_iterator(cfg(path, seq_len=500), 4, seed=0)
    with pytest.raises(ValueError, match="vocab_size=.* is larger than the model's vocab_size=100"):
        data.make_train_iterator(cfg(path), 4, seed=0, vocab_size=100)
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        data.make_train_iterator(cfg(path), 4, seed=0, process_index=0, process_count=3)
    m = json.load(open(path / "manifest.json"))
    os.remove(path / m["shards"][0]["path"])
    with pytest.raises(FileNotFoundError, match="train-00000-of-00003.array_record"):
        data.make_train_iterator(cfg(path), 4, seed=0)


# ----------------------------------------------------------------------------- data on GCS

def test_gs_data_path_read_through_its_mount_gives_the_same_batches(tmp_path, monkeypatch):
    """data.path=gs://bkt/shards with $DANLU_MOUNTS mapping gs://bkt to a local directory (what
    `danlu launch tpu setup` + `run` arrange with gcsfuse) reads the same batches as the local path,
    and the iterator state (its data fingerprint) is the same, so a run can resume across the two."""
    write_shards(tmp_path / "bucket" / "shards", LENGTHS, eval_lengths=[6, 4], num_train_shards=3)
    local = tmp_path / "bucket" / "shards"
    expected = take(data.make_train_iterator(cfg(local), 4, seed=3, start_step=2), 5)
    expected_eval = data.make_eval_batches(cfg(local, seq_len=8), 2, 3)
    state = data.make_train_iterator(cfg(local), 4, seed=3).get_state()

    monkeypatch.setenv("DANLU_MOUNTS", f"gs://other=/nowhere,gs://bkt={tmp_path / 'bucket'}")
    docs = data._Documents("gs://bkt/shards", data.load_manifest("gs://bkt/shards"), "train")
    assert all(f.startswith(f"{local}/") for f in docs.files)  # the shards are opened from the mount
    assert_batches_equal(take(data.make_train_iterator(cfg("gs://bkt/shards"), 4, seed=3, start_step=2), 5), expected)
    assert_batches_equal(data.make_eval_batches(cfg("gs://bkt/shards", seq_len=8), 2, 3), expected_eval)
    assert data.make_train_iterator(cfg("gs://bkt/shards"), 4, seed=3).get_state() == state
    # A file:// URL is a local path.
    assert_batches_equal(take(data.make_train_iterator(cfg(f"file://{local}"), 4, seed=3, start_step=2), 5), expected)


def test_gs_data_path_not_mounted_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DANLU_MOUNTS", raising=False)
    for make in (lambda c: data.make_train_iterator(c, 4, seed=0), lambda c: data.make_eval_batches(c, 2, 1)):
        with pytest.raises(data.ConfigError) as e:
            make(cfg("gs://bkt/shards"))
        msg = str(e.value)
        assert msg.startswith("data.path='gs://bkt/shards' is not mounted here ($DANLU_MOUNTS='')")
        assert "`danlu launch tpu setup` mounts gs://bkt with gcsfuse on every worker" in msg
        assert "DANLU_MOUNTS=gs://bkt/shards=/mnt/bkt/shards" in msg
    monkeypatch.setenv("DANLU_MOUNTS", "gs://bkt2=/mnt/bkt2")  # another bucket (a prefix of the name) is mounted
    with pytest.raises(data.ConfigError, match="DANLU_MOUNTS='gs://bkt2=/mnt/bkt2'"):
        data.make_train_iterator(cfg("gs://bkt/shards"), 4, seed=0)
    # Mounted, but nothing there (the bucket is not mounted at that directory): the paths are named.
    monkeypatch.setenv("DANLU_MOUNTS", f"gs://bkt={tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match=r"no manifest.json in data.path='gs://bkt/shards' \(mounted at "):
        data.make_train_iterator(cfg("gs://bkt/shards"), 4, seed=0)


def test_manifest_is_read_through_fsspec_from_any_url(shards):
    """manifest.json (and the shard list it names) from memory://, through danlu.base.fs."""
    import fsspec

    path, _ = shards
    mem = fsspec.filesystem("memory")
    for f in sorted(os.listdir(path)):
        mem.pipe(f"/danlu-test-bkt/shards/{f}", (path / f).read_bytes())
    try:
        assert data.load_manifest("memory://danlu-test-bkt/shards") == data.load_manifest(str(path))
        assert data._fingerprint("memory://danlu-test-bkt/shards") == data._fingerprint(str(path))
        with pytest.raises(FileNotFoundError, match="no manifest.json in data.path='memory://danlu-test-bkt/nowhere'"):
            data.load_manifest("memory://danlu-test-bkt/nowhere")
        mem.rm("/danlu-test-bkt/shards/train-00001-of-00003.array_record")
        with pytest.raises(FileNotFoundError, match="shards.1. names 'train-00001-of-00003.array_record'"):
            data.load_manifest("memory://danlu-test-bkt/shards")
    finally:
        mem.rm("/danlu-test-bkt", recursive=True)
