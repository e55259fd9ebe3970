"""Loss, perplexity and bits per byte of a checkpoint on held-out data (the library of `danlu eval`,
whose command, in danlu/evaluate.py, reads text inputs with data_pipeline's readers).

Inputs (``--data``, any mix): a directory of token shards with manifest.json (`danlu tokenize`;
the ``--split``, default eval, read with pretrain/data.py's readers) or documents (JSONL plain,
.gz, .zst, .bz2 or .xz, Parquet, WET; files, globs, directories, URLs: data_pipeline/readers.py,
``--reader``, ``--max-doc-bytes``, ``--text-key``), tokenized with the checkpoint's sentencepiece
model. Records that cannot be read are skipped and counted (``errors`` in the report).

Each document is scored on its own: the model reads EOS (the separator it was trained to start a
document after) then the document, and predicts every token of the document exactly once.
Documents longer than the context are cut into windows of ``seq_len`` predictions, each window
starting afresh at position 0 (as a document continuing into a new training row does). Windows
are packed into rows with segment masking, so nothing attends across documents.

    loss = total nats / predicted tokens,  perplexity = exp(loss),
    bits per byte = total nats / ln 2 / UTF-8 bytes of the documents' text

Bytes are the documents' ``text`` fields, or for shards the decoded text of each document (needs the
tokenizer; byte fallback makes decoding exact). ``--packed`` instead scores the shards' split
exactly as the train loop's evaluation does (rows of data.seq_len packed across documents,
train.global_batch_size rows per batch, ``--batches`` batches, default data.eval_batches), so
its loss equals the run's ``eval_loss`` at that checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np


@dataclasses.dataclass
class Totals:
    """Sums over what was scored; bytes is None when the text is unknown (shards without tokenizer, --packed)."""
    nats: float = 0.0
    tokens: int = 0
    documents: int = 0
    bytes: int | None = 0
    errors: int = 0  # records of the documents that could not be read, skipped

    def add(self, other: "Totals") -> None:
        self.nats += other.nats
        self.tokens += other.tokens
        self.documents += other.documents
        self.bytes = None if self.bytes is None or other.bytes is None else self.bytes + other.bytes
        self.errors += other.errors

    def report(self) -> dict:
        loss = self.nats / self.tokens if self.tokens else float("nan")
        bpb = self.nats / math.log(2) / self.bytes if self.bytes else None
        return {"loss": loss, "perplexity": math.exp(loss) if self.tokens else float("nan"),
                "bits_per_byte": bpb, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes,
                "nats": self.nats, "errors": self.errors}


def pack_windows(docs: Iterable[list[int]], eos_id: int, seq_len: int, rows_per_batch: int) -> Iterator[dict]:
    """Batches scoring each document once: int32 [rows_per_batch, seq_len] inputs, targets,
    segment_ids (0 = padding) and positions, with every token of every document a target once."""
    def empty():
        return {k: np.zeros((rows_per_batch, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}

    batch, row, col, seg = empty(), 0, 0, 0
    for doc in docs:
        stream = np.asarray([eos_id] + list(doc), np.int32)
        for a in range(0, len(doc), seq_len):
            n = min(seq_len, len(doc) - a)
            if col + n > seq_len:  # the window does not fit in this row: next row
                row, col, seg = row + 1, 0, 0
            if row == rows_per_batch:
                yield batch
                batch, row, col, seg = empty(), 0, 0, 0
            seg += 1
            batch["inputs"][row, col:col + n] = stream[a:a + n]
            batch["targets"][row, col:col + n] = stream[a + 1:a + n + 1]
            batch["segment_ids"][row, col:col + n] = seg
            batch["positions"][row, col:col + n] = np.arange(n)
            col += n
    if row or col:
        yield batch


class Scorer:
    """A jitted (params, batch) -> (sum of token nats, tokens) for one model config."""

    def __init__(self, model_cfg, params: dict):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from pretrain.loss import cross_entropy
        from pretrain.model import init_model
        from pretrain.train import merge_model

        graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: init_model(model_cfg, 0)))

        def score(params, batch):
            model = merge_model(graphdef, abstract_state, params)
            hidden_BxTxD = model(batch["inputs"], batch["positions"], batch["segment_ids"])
            weights_BxT = batch["segment_ids"] > 0
            ce, _ = cross_entropy(hidden_BxTxD, model.unembedding(), batch["targets"], weights_BxT)
            return ce, jnp.sum(weights_BxT)

        self._score = jax.jit(score)
        self.params = params

    def __call__(self, batches: Iterable[dict]) -> tuple[float, int]:
        import jax

        outs = [self._score(self.params, b) for b in batches]  # dispatched together, read back once
        outs = jax.device_get(outs)
        return float(sum(float(c) for c, _ in outs)), int(sum(int(n) for _, n in outs))


def _inference_model_config(m, *, segment_masking: bool | None = True):
    """The checkpoint's model config for scoring here: TPU/GPU-only attention kernels -> xla."""
    import jax

    changes = {"remat": "none"}
    if segment_masking is not None:
        changes["segment_masking"] = segment_masking
    platform = jax.devices()[0].platform
    if (m.attention == "splash" and platform != "tpu") or (m.attention == "cudnn" and platform != "gpu"):
        changes["attention"] = "xla"
    return dataclasses.replace(m, **changes)


def _shard_documents(path: str, split: str, vocab_size: int) -> tuple[Iterator[list[int]], int]:
    from pretrain.data import _Documents, load_manifest

    manifest = load_manifest(path, vocab_size)
    docs = _Documents(path, manifest, split)
    if len(docs) == 0:
        raise ValueError(f"{path}: the {split!r} split has no documents (splits here: "
                         f"{sorted({s['split'] for s in manifest['shards'] if s['documents']})})")

    def gen():
        for start in range(0, len(docs), 256):
            ids = range(start, min(start + 256, len(docs)))
            got = docs.read(ids)
            for i in ids:
                yield got[i].astype(np.int64).tolist()
    return gen(), manifest["eos_id"]


def evaluate_checkpoint(ckpt, data: list[str], *, tokenizer: str | None = None, split: str = "eval",
                        seq_len: int | None = None, batch_size: int = 8, max_documents: int | None = None,
                        packed: bool = False, batches: int | None = None,
                        documents: Callable[[str, list], Iterable[str]] | None = None) -> dict:
    """{"total": report, "inputs": {path: report}} for a Checkpoint (pretrain.generate.load_checkpoint).

    A report has loss (nats per token), perplexity, bits_per_byte (None when the text is
    unknown), tokens, documents, bytes, errors (records of documents that could not be read,
    skipped). An input that is not a directory of token shards is text: `documents(path, errors)`
    gives its documents' texts and appends a row to `errors` for each record it could not read
    (`danlu eval` passes data_pipeline's readers, see danlu/evaluate.py).
    """
    from pretrain.config import DataConfig
    from pretrain.generate import find_tokenizer

    cfg = ckpt.cfg
    seq_len = seq_len or cfg.data.seq_len
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"--seq-len ({seq_len}) and --batch-size ({batch_size}) must be positive")
    if cfg.model.position == "learned" and seq_len > cfg.model.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the learned position table (model.max_seq_len={cfg.model.max_seq_len})")
    tok_path = find_tokenizer(ckpt, tokenizer)
    sp = None
    if tok_path:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=tok_path)
    scorer = Scorer(_inference_model_config(cfg.model, segment_masking=None if packed else True), ckpt.params)
    total, per_input = Totals(), {}
    for path in data:
        t = Totals()
        errors: list[dict] = []
        is_shards = os.path.isfile(os.path.join(path, "manifest.json"))
        if packed:
            if not is_shards:
                raise ValueError(f"--packed scores token shards the way training does; {path!r} has no manifest.json")
            from pretrain.data import make_eval_batches

            dc = DataConfig(path=path, seq_len=cfg.data.seq_len, shuffle=False)
            rows = make_eval_batches(dc, cfg.train.global_batch_size, batches or cfg.data.eval_batches,
                                     vocab_size=cfg.model.vocab_size)
            t.nats, t.tokens = scorer(rows)
            t.bytes = None
        else:
            if is_shards:
                ids_docs, eos_id = _shard_documents(path, split, cfg.model.vocab_size)
                docs = ((ids, len(sp.decode(ids).encode("utf-8")) if sp else None) for ids in ids_docs)
            elif sp is None:
                raise ValueError(f"{path}: JSONL text needs the checkpoint's tokenizer; none found, pass --tokenizer MODEL")
            elif documents is None:
                raise ValueError(f"{path}: not a directory of token shards, and no document reader was given for text")
            else:
                texts = documents(path, errors)
                docs, eos_id = ((sp.encode(text), len(text.encode("utf-8"))) for text in texts), sp.eos_id()

            def counted(docs):
                """Token ids of the first max_documents non-empty documents, counted into t."""
                for ids, nbytes in docs:
                    if max_documents is not None and t.documents >= max_documents:
                        return
                    if not ids:
                        continue
                    t.documents += 1
                    t.bytes = None if t.bytes is None or nbytes is None else t.bytes + nbytes
                    yield ids

            t.nats, t.tokens = scorer(pack_windows(counted(docs), eos_id, seq_len, batch_size))
            t.errors = len(errors)
        per_input[path] = t.report()
        total.add(t)
    return {"total": total.report(), "inputs": per_input, "seq_len": seq_len, "packed": packed,
            "checkpoint_step": ckpt.step}
