"""Training and eval batches from token shards (see data_pipeline/tokenize.py), with grain.

Packing. The documents of the train split are laid end to end, each followed by EOS,
into one stream per epoch (in a seeded per-epoch permutation of the documents), and the
stream is cut into sequences of seq_len + 1 tokens; the tail shorter than that is
dropped. For a sequence `s` (one row):

    inputs      = s[:-1]                                   int32 [seq_len]
    targets     = s[1:]                                    int32 [seq_len]
    segment_ids = 1, 2, ... per document piece in the row  int32 [seq_len]
    positions   = 0, 1, ... restarting at each piece       int32 [seq_len]

The EOS belongs to the document it ends. A document continuing from the previous row
is a new piece: fresh segment id and positions from 0 (attention cannot see the part
in the previous row; positions stay < seq_len). Rows are never padded, so segment id 0
never occurs.

Order. Sequence j of epoch e depends only on (seed, e, j); the sequences of an epoch are
shuffled by grain (seed + e), epochs follow one another forever. Global batch b is
sequences [b*B, (b+1)*B) of that order; process p of P takes rows [p*B/P, (p+1)*B/P).
So batch b is a pure function of (data, seed, B, seq_len, b): resuming at step b is
exact and free, and the union of P processes' batches is the 1-process batch.

Everything is index-addressed (grain MapDataset), so `start_step` costs nothing and the
iterator's state is just the step.

Where. `data.path` is a local directory or a URL. manifest.json is read through
danlu.base.fs (fsspec: any URL); the ArrayRecord shards need POSIX files, so they and
their `.lengths.npy` sidecars are read from the local directory a URL is mounted on
($DANLU_MOUNTS="gs://bucket/shards=/mount/dir/shards", set by `danlu launch tpu run`
after `setup` mounted the bucket with gcsfuse on every worker; a mapped URL's manifest
and sidecars are read there too). A URL that is not mounted is refused (`shard_dir`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from danlu.base import fs
from danlu.base.config import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


# ----------------------------------------------------------------------------- manifest

def shard_dir(path: str) -> str:
    """The local directory the ArrayRecord shards of data.path=`path` are read from: `path`
    itself, a file:// URL's path, or, for a URL under a mounted bucket, its mount
    ($DANLU_MOUNTS). A URL that is not mounted raises ConfigError saying how to mount it."""
    local = fs.local_path(fs.mounted(path))
    if local is None:
        scheme, _, rest = path.rstrip("/").partition("://")
        name = rest.split("/")[0] or "BUCKET"
        raise ConfigError(
            f"data.path={path!r} is not mounted here (${fs.MOUNTS_ENV}={os.environ.get(fs.MOUNTS_ENV, '')!r}), "
            f"and the token shards (ArrayRecord) can only be read as local files. On Cloud TPU: "
            f"`danlu launch tpu setup` mounts {scheme}://{name} with gcsfuse on every worker and `danlu launch tpu "
            f"run` sets ${fs.MOUNTS_ENV}. Elsewhere: mount the bucket (gcsfuse -o ro --implicit-dirs {name} "
            f"/mnt/{name}) and set {fs.MOUNTS_ENV}={scheme}://{rest}=/mnt/{rest}, or copy the shards to a local "
            f"directory")
    return local


def _read(path: str) -> bytes:
    with fs.open_input(path) as f:
        return f.read()


def load_manifest(path: str, vocab_size: int | None = None) -> dict:
    """Reads and checks `path/manifest.json`.

    Args:
      path: directory written by `danlu tokenize`: a local path or a URL (read through
        fsspec, or from its mount when $DANLU_MOUNTS maps it).
      vocab_size: the model's vocabulary size, if known; must be >= the tokenizer's.

    Raises:
      FileNotFoundError / ValueError naming the path and key at fault.
    """
    root = fs.mounted(path)
    mpath = os.path.join(path, MANIFEST)  # as the user wrote it, for the messages
    try:
        text = _read(os.path.join(root, MANIFEST))
    except (FileNotFoundError, NotADirectoryError):
        hint = " (it is a file; data.path must be the directory)" if fs.isfile(root) else ""
        where = f" (mounted at {root!r} by ${fs.MOUNTS_ENV})" if root != path else ""
        raise FileNotFoundError(
            f"no {MANIFEST} in data.path={path!r}{where}{hint}; create token shards with "
            f"`danlu tokenize --input FILE... --output {path}`") from None
    try:
        m = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath}: not valid JSON ({e})") from None
    for key in ("shards", "vocab_size", "eos_id"):
        if key not in m:
            raise ValueError(f"{mpath}: missing key {key!r}")
    if m.get("dtype", "<u4") != "<u4":
        raise ValueError(f"{mpath}: dtype {m['dtype']!r} is not supported (expected '<u4')")
    if m.get("eos_appended", False):
        raise ValueError(f"{mpath}: eos_appended=true; this loader inserts EOS itself and "
                         "expects records without it")
    if not 0 <= m["eos_id"] < m["vocab_size"]:
        raise ValueError(f"{mpath}: eos_id={m['eos_id']} outside vocab_size={m['vocab_size']}")
    if vocab_size is not None and m["vocab_size"] > vocab_size:
        raise ValueError(
            f"{mpath}: tokenizer vocab_size={m['vocab_size']} is larger than the model's "
            f"vocab_size={vocab_size}; set model.vocab_size >= {m['vocab_size']} or re-tokenize")
    for i, sh in enumerate(m["shards"]):
        for key in ("path", "split", "documents"):
            if key not in sh:
                raise ValueError(f"{mpath}: shards[{i}] is missing key {key!r}")
        if sh["documents"] and not fs.isfile(os.path.join(root, sh["path"])):
            raise FileNotFoundError(f"{mpath}: shards[{i}] names {sh['path']!r}, which is missing")
    return m


def _fingerprint(path: str) -> str:
    """Identity of the data in the iterator state: the manifest's bytes, wherever they are read from."""
    return hashlib.sha256(_read(os.path.join(fs.mounted(path), MANIFEST))).hexdigest()[:16]


def _open_split(path: str, split: str, vocab_size: int | None) -> tuple["_Documents", dict]:
    """(documents of `split`, manifest) of data.path=`path`; an unmounted URL fails first, before any read."""
    shard_dir(path)
    manifest = load_manifest(path, vocab_size)
    return _Documents(path, manifest, split), manifest


# ----------------------------------------------------------------------------- documents

class _Documents:
    """Random access to the documents of one split: token ids by document index.

    Document index = position in the split's shards, in manifest order. Lengths come
    from the `.lengths.npy` sidecars (or, if a shard has none, from reading it once).
    Shards and sidecars are opened from `shard_dir(path)` (the mount of a URL).
    Picklable (grain worker processes), readers reopen lazily.
    """

    def __init__(self, path: str, manifest: dict, split: str):
        self.path = path
        self.split = split
        local = shard_dir(path)
        shards = [sh for sh in manifest["shards"] if sh["split"] == split and sh["documents"] > 0]
        self.files = [os.path.join(local, sh["path"]) for sh in shards]
        lengths = []
        for sh, file in zip(shards, self.files):
            lengths.append(self._shard_lengths(sh, local, file))
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        self._source = None

    def _shard_lengths(self, shard: dict, local: str, file: str) -> np.ndarray:
        side = shard.get("lengths") and os.path.join(local, shard["lengths"])
        if side and os.path.isfile(side):
            lengths = np.load(side)
        else:
            log.warning("%s: no lengths sidecar; reading every record to count tokens", file)
            src = grain.sources.ArrayRecordDataSource([file])
            lengths = np.array([len(src[i]) // 4 for i in range(len(src))], np.int64)
        if len(lengths) != shard["documents"]:
            raise ValueError(f"{file}: {len(lengths)} lengths but the manifest says "
                             f"{shard['documents']} documents; re-run `danlu tokenize`")
        return lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def read(self, doc_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """{doc id: uint32 [length]} for the distinct ids given (one batched read)."""
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.files)
        ids = sorted(set(int(i) for i in doc_ids))
        records = self._source.__getitems__(ids)
        out = {}
        for i, rec in zip(ids, records):
            arr = np.frombuffer(rec, dtype="<u4")
            if len(arr) != self.lengths[i]:
                raise ValueError(f"{self.path}: {self.split} document {i} has {len(arr)} tokens, "
                                 f"its lengths sidecar says {self.lengths[i]}; shards are inconsistent")
            out[i] = arr
        return out


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Documents in a given order laid end to end, each followed by EOS.

    order: int64 [n] document ids; ends: int64 [n] exclusive end of each in the stream.
    """

    order: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, order: np.ndarray, lengths: np.ndarray) -> "_Layout":
        return cls(order, np.cumsum(lengths[order] + 1))

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """[(k, lo, hi)]: stream[start:stop] is doc order[k] (+EOS) [lo:hi] for each piece in turn.

        Positions wrap around the stream (stream[total] == stream[0]), which only the
        eval set, when too small, uses.
        """
        out = []
        pos = start
        while pos < stop:
            p = pos % self.total
            k = int(np.searchsorted(self.ends, p, side="right"))
            doc_start = int(self.ends[k - 1]) if k else 0
            take = min(stop - pos, int(self.ends[k]) - p)
            out.append((k, p - doc_start, p - doc_start + take))
            pos += take
        return out


def _assemble(pieces, layout: _Layout, docs: dict[int, np.ndarray], eos_id: int) -> dict[str, np.ndarray]:
    """One packed row from its pieces: inputs/targets/segment_ids/positions, int32 [seq_len]."""
    tokens, segs, poss = [], [], []
    for seg, (k, lo, hi) in enumerate(pieces, start=1):
        doc = docs[int(layout.order[k])]
        n = len(doc)
        part = doc[lo:min(hi, n)].astype(np.int32)
        if hi > n:  # the piece includes the document's EOS
            part = np.concatenate([part, np.array([eos_id], np.int32)])
        tokens.append(part)
        segs.append(np.full(hi - lo, seg, np.int32))
        poss.append(np.arange(hi - lo, dtype=np.int32))
    tok = np.concatenate(tokens)  # [seq_len + 1]
    seg = np.concatenate(segs)
    pos = np.concatenate(poss)
    return {"inputs": tok[:-1], "targets": tok[1:], "segment_ids": seg[:-1], "positions": pos[:-1]}


class PackedSequences(grain.MapDataset):
    """Packed train sequences; index i = epoch * len(self) + j, for any epoch >= 0.

    One epoch is the whole train split in the epoch's document order (a permutation
    seeded by (seed, epoch), or manifest order when shuffle=False), cut into
    len(self) = total // (seq_len + 1) rows. Elements: dict of int32 [seq_len] arrays.
    Epochs beyond the first are addressed directly: grain's shuffle and repeat pass
    indices past len(self) through, and the epoch is read off the index here.
    """

    def __init__(self, docs: _Documents, seq_len: int, eos_id: int, seed: int, shuffle: bool):
        super().__init__()
        self._docs = docs
        self._seq_len = seq_len
        self._eos_id = eos_id
        self._seed = seed
        self._shuffle = shuffle
        self._epoch_tokens = int(np.sum(docs.lengths + 1))
        self._len = self._epoch_tokens // (seq_len + 1)
        self._layouts: dict[int, _Layout] = {}  # small cache: batches rarely span > 2 epochs

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        return f"PackedSequences(seq_len={self._seq_len}, rows_per_epoch={self._len})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_layouts"] = {}
        return state

    def _layout(self, epoch: int) -> _Layout:
        if epoch not in self._layouts:
            n = len(self._docs)
            if self._shuffle:
                order = np.random.default_rng([self._seed, epoch]).permutation(n)
            else:
                order = np.arange(n)
            if len(self._layouts) >= 2:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[epoch] = _Layout.of(order, self._docs.lengths)
        return self._layouts[epoch]

    def _pieces(self, index: int):
        epoch, j = divmod(int(index), self._len)
        layout = self._layout(epoch)
        start = j * (self._seq_len + 1)
        return layout, layout.pieces(start, start + self._seq_len + 1)

    def _getitems(self, indices: Sequence[int]):
        # One batched read for all documents of all rows (grain's batch calls this).
        planned = [self._pieces(i) for i in indices]
        ids = [int(layout.order[k]) for layout, pieces in planned for k, _, _ in pieces]
        docs = self._docs.read(ids)
        return [_assemble(pieces, layout, docs, self._eos_id) for layout, pieces in planned]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._getitems([index])[0]


# ----------------------------------------------------------------------------- train

def _check_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                         f"process count {process_count}")
    return global_batch_size // process_count


def make_train_dataset(data_cfg, global_batch_size: int, *, seed: int, process_index: int = 0,
                       process_count: int = 1, vocab_size: int | None = None) -> grain.MapDataset:
    """This process's train batches as an infinite grain MapDataset: element b = step b.

    Element: dict of int32 [global_batch_size // process_count, seq_len] arrays
    (BATCH_KEYS); rows [p*B/P, (p+1)*B/P) of global batch b.
    """
    _check_batch(global_batch_size, process_index, process_count)
    if data_cfg.seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {data_cfg.seq_len}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    docs, manifest = _open_split(data_cfg.path, "train", vocab_size)
    if len(docs) == 0:
        raise ValueError(f"{data_cfg.path}: the train split has no documents")
    seqs = PackedSequences(docs, data_cfg.seq_len, manifest["eos_id"], seed, data_cfg.shuffle)
    if len(seqs) == 0:
        raise ValueError(
            f"{data_cfg.path}: data.seq_len={data_cfg.seq_len} is longer than the whole train split "
            f"({seqs._epoch_tokens} tokens incl. one EOS per document); lower data.seq_len or add data")
    if len(seqs) < global_batch_size:
        log.warning("%s: one epoch has %d sequences of %d tokens, fewer than global_batch_size=%d; "
                    "each batch spans several epochs", data_cfg.path, len(seqs), data_cfg.seq_len,
                    global_batch_size)
    ds = seqs.shuffle(seed) if data_cfg.shuffle else seqs
    # repeat() only lifts the length to "infinite"; shuffle reseeds itself per epoch
    # (seed + epoch) and PackedSequences reads the epoch off the index.
    ds = ds.repeat()
    return ProcessBatches(ds, global_batch_size, process_index, process_count)


class ProcessBatches(grain.MapDataset):
    """Element b: rows [p*B/P, (p+1)*B/P) of global batch b = parent[b*B : (b+1)*B], stacked.

    Not grain's batch + slice: this states the multi-process contract directly, and
    reads all rows with one `_getitems` call, so documents are fetched in one batch.
    Elements: dict of int32 [B/P, seq_len].
    """

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._global = global_batch_size
        self._rows = global_batch_size // process_count
        self._offset = process_index * self._rows

    def __len__(self) -> int:
        return len(self._parent) // self._global

    def __str__(self) -> str:
        return f"ProcessBatches(rows={self._offset}:{self._offset + self._rows} of {self._global})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        first = int(index) * self._global + self._offset
        rows = self._parent._getitems(list(range(first, first + self._rows)))  # pylint: disable=protected-access
        return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def _absl_flags_parsed() -> None:
    """grain 0.2.18's mp_prefetch reads absl flags (worker profiling) with `.value`,
    which raises unless flags were parsed; programs not started by absl.app never parse
    them. Marking them parsed keeps every default and is what absl.app would do."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator(grain.DatasetIterator):
    """Iterator over train batches with a tiny, process-independent state: the step.

    A grain DatasetIterator, so grain's orbax CheckpointHandler (grain.checkpoint)
    saves it as JSON. `set_state` rebuilds the pipeline at the saved step, which is
    cheap because the dataset is index-addressed; the state does not depend on
    worker_count, so that may change between runs.
    """

    def __init__(self, dataset: grain.MapDataset, *, start_step: int, worker_count: int, identity: dict):
        super().__init__()
        self._dataset = dataset
        self._worker_count = worker_count
        self._identity = identity
        self._step = start_step
        self._it = None

    def _open(self):
        ds = self._dataset[self._step:] if self._step else self._dataset
        # Whole batches are the elements: a few in flight is plenty.
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
        if self._worker_count > 0:
            _absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        return iter(it_ds)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._open()
        batch = next(self._it)
        if self._worker_count > 0:
            # Worker batches arrive in grain's shared-memory arrays, freed when collected;
            # plain copies (a few MB) keep that lifetime out of the caller's hands.
            batch = {k: np.array(v) for k, v in batch.items()}
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        """Index of the batch the next `next()` returns."""
        return self._step

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        for key, value in self._identity.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"data iterator state was saved with {key}={state[key]!r}, this run has {value!r}; "
                    f"batches would differ. To continue anyway, build the iterator with start_step="
                    f"{state['step']} instead of restoring its state")
        self.close()
        self._step = int(state["step"])

    def start_prefetch(self) -> None:
        if self._it is None:
            self._it = self._open()
        self._it.start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def __str__(self) -> str:
        return f"TrainIterator(step={self._step})"


def make_train_iterator(data_cfg, global_batch_size: int, *, seed: int, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0,
                        vocab_size: int | None = None) -> TrainIterator:
    """Iterator of this process's train batches, starting at global batch `start_step`.

    Args:
      data_cfg: has .path (shard directory), .seq_len, .shuffle, .worker_count.
      global_batch_size: sequences per step over all processes; divisible by process_count.
      seed: data order seed, in [0, 2**32).
      process_index, process_count: this process's slice of each global batch.
      start_step: the first batch returned is global batch `start_step`.
      vocab_size: the model's vocabulary size, checked against the tokenizer's if given.

    Yields:
      dict of int32 [global_batch_size // process_count, data.seq_len] numpy arrays:
      inputs, targets, segment_ids, positions (module docstring).
    """
    ds = make_train_dataset(data_cfg, global_batch_size, seed=seed, process_index=process_index,
                            process_count=process_count, vocab_size=vocab_size)
    identity = {"seed": int(seed), "global_batch_size": int(global_batch_size),
                "seq_len": int(data_cfg.seq_len), "shuffle": bool(data_cfg.shuffle),
                "data": _fingerprint(data_cfg.path)}
    return TrainIterator(ds, start_step=int(start_step), worker_count=int(getattr(data_cfg, "worker_count", 0)),
                         identity=identity)


# ----------------------------------------------------------------------------- eval

def make_eval_batches(data_cfg, global_batch_size: int, num_batches: int, *, process_index: int = 0,
                      process_count: int = 1, vocab_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """Fixed eval batches: the eval split in manifest order, packed like train, no shuffle.

    Row r of global batch b is eval sequence b * B + r. If the eval split has fewer
    tokens than num_batches * B * (seq_len + 1), the stream wraps around to its start
    (documents repeat). Process p gets rows [p*B/P, (p+1)*B/P) of each batch.

    Returns:
      num_batches dicts of int32 [global_batch_size // process_count, seq_len] arrays.

    Raises:
      ValueError if the eval split is empty (tokenize with --eval-fraction > 0).
    """
    per_process = _check_batch(global_batch_size, process_index, process_count)
    docs, manifest = _open_split(data_cfg.path, "eval", vocab_size)
    if len(docs) == 0:
        raise ValueError(f"{data_cfg.path}: the eval split is empty; re-run `danlu tokenize` with "
                         "--eval-fraction > 0 (or set data.eval_batches=0)")
    layout = _Layout.of(np.arange(len(docs)), docs.lengths)
    row = data_cfg.seq_len + 1
    if num_batches * global_batch_size * row > layout.total:
        log.info("%s: eval split has %d tokens; %d batches need %d, so it repeats", data_cfg.path,
                 layout.total, num_batches, num_batches * global_batch_size * row)
    batches = []
    for b in range(num_batches):
        first = b * global_batch_size + process_index * per_process
        plans = [layout.pieces(r * row, (r + 1) * row) for r in range(first, first + per_process)]
        texts = docs.read([int(layout.order[k]) for pieces in plans for k, _, _ in pieces])
        rows = [_assemble(pieces, layout, texts, manifest["eos_id"]) for pieces in plans]
        batches.append({k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS})
    return batches
