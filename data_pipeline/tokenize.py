"""Tokenization: train a sentencepiece model, encode documents into ArrayRecord token shards.

Output directory of `encode_to_shards` (the token-shard contract of docs/design.md):

    manifest.json                          what is here; written last, so its presence means "complete"
    tokenizer.model                        the sentencepiece model the ids come from (copied in if needed)
    train-00000-of-0000K.array_record      one record per document: token ids, little-endian uint32
    train-00000-of-0000K.lengths.npy       uint32 [documents]: tokens per record, so loaders need not scan
    eval-00000-of-0000E.array_record       the held-out split, same format
    eval-00000-of-0000E.lengths.npy
    errors.jsonl                           records set aside: file, line/row/offset (or id), kind, reason,
                                           bytes, raw snippet

Records hold the document's ids only: no BOS, no EOS (`"eos_appended": false` in the
manifest); the loader inserts separators when it packs documents into sequences.

Special ids are fixed for every model trained here: pad=0, unk=1, bos=2, eos=3.

Split and shard of a document depend only on its `id` (blake2b), never on input order,
shard count or worker count; so the eval set stays the eval set when the corpus is
re-sharded or grows, and the same inputs and flags give byte-identical outputs.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import heapq
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
from typing import Iterator, Sequence

import numpy as np

from danlu.base import fs as dio
from data_pipeline import readers as R

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SHARD_OPTIONS = "group_size:1,zstd:3"  # group_size 1: every record randomly addressable (grain)
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FORMAT = "danlu.token_shards"
MANIFEST_VERSION = 1
# Training "sentences" are runs of whole lines up to this many UTF-8 bytes; see `_training_chunks`.
TRAIN_CHUNK_BYTES = 8192
_SHARD_FILE_RE = re.compile(r"^(train|eval)-\d{5}-of-\d{5}\.(array_record|lengths\.npy)$")


# ----------------------------------------------------------------------------- hashing

def _id_hash(doc_id: str, salt: str = "") -> bytes:
    return hashlib.blake2b((salt + doc_id).encode("utf-8"), digest_size=16).digest()


def split_key(doc_id: str) -> float:
    """Uniform in [0, 1) from the id alone; the document is eval iff split_key < eval_fraction."""
    return int.from_bytes(_id_hash(doc_id)[:8], "big") / 2.0**64


def _shard_of(doc_id: str, num_shards: int) -> int:
    # The other half of the same digest: independent of the split bits.
    return int.from_bytes(_id_hash(doc_id)[8:], "big") % num_shards


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading

def _iter_documents(shards: Sequence[R.Shard], errors: list[dict] | None = None,
                    dropped: collections.Counter | None = None) -> Iterator[tuple[R.Shard, dict]]:
    """(shard, document) for the documents of `shards`, in input order.

    Records that cannot be read go to `errors` (if given) as errors.jsonl rows (`readers.error_row`);
    documents with empty text too (kind "empty_text", with their id): they would add nothing but a
    separator. Records a reader skips on purpose are counted in `dropped` by reason.
    """
    for shard, doc in R.read_documents(shards, errors, dropped):
        if doc["text"] == "":
            if errors is not None:
                errors.append(R.error_row(R.ReadError(shard.name, "empty_text", "empty text: nothing to tokenize",
                                                      {"id": doc["id"]})))
            continue
        yield shard, doc


# ----------------------------------------------------------------------------- training

def _training_chunks(text: str, max_bytes: int = TRAIN_CHUNK_BYTES) -> Iterator[str]:
    """Splits a document into runs of whole lines (newlines kept) of at most `max_bytes`.

    Why not whole documents: sentencepiece silently drops "sentences" longer than
    max_sentence_length, and its trainers slow down badly on very long ones. Why not
    single lines: "\\n" would never be seen in training, so it would stay a lone
    byte-fallback token and pieces like "):\\n" could not be learned.
    A single line longer than `max_bytes` is cut at character boundaries.
    """
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if n > max_bytes:
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            # max_bytes // 4 characters are at most max_bytes UTF-8 bytes.
            step = max(1, max_bytes // 4)
            for i in range(0, len(line), step):
                yield line[i:i + step]
            continue
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def sample_documents(inputs: Sequence[str], sample_docs: int, seed: int = 0,
                     flags: R.InputFlags = R.InputFlags()) -> list[str]:
    """Texts of up to `sample_docs` valid documents of `inputs` (read with `flags`), chosen by a
    seeded hash of their id.

    Bottom-k sampling on blake2b(seed, id): the sample depends on the set of documents,
    not their order, and is the same on every run. Returned in order of that hash.
    """
    heap: list[tuple[int, int, str]] = []  # (-key, tiebreak, text): a max-heap of the k smallest keys
    salt = f"danlu-sample-{seed}:"
    for n, (_, doc) in enumerate(_iter_documents(flags.plan(inputs))):
        key = int.from_bytes(_id_hash(doc["id"], salt)[:8], "big")
        item = (-key, -n, doc["text"])
        if len(heap) < sample_docs:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    return [text for _, _, text in sorted(heap, reverse=True)]


def train_tokenizer(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    sample_docs: int = 100_000,
    seed: int = 0,
    num_threads: int = 8,
    character_coverage: float = 0.9995,
    split_digits: bool = True,
    flags: R.InputFlags = R.InputFlags(),
) -> str:
    """Trains a sentencepiece model on a deterministic sample of documents.

    Args:
      inputs: files, globs, directories or URLs of documents (JSONL, Parquet, WET, ...: `readers`).
      model_prefix: output path without suffix; writes `<prefix>.model` and `<prefix>.vocab`.
      vocab_size: target size. `hard_vocab_limit=False`, so a corpus too small for it
        gives a smaller vocabulary instead of an error (read the real size off the model).
      model_type: "bpe" or "unigram".
      byte_fallback: unknown characters become UTF-8 byte pieces, so every text
        round-trips (decode(encode(t)) == t) and unk is never produced.
      sample_docs: at most this many documents, chosen by `sample_documents`.
      seed: seeds the document sample.
      num_threads: sentencepiece trainer threads. The trained model depends on it (it
        changes the reduction order), so it is a fixed default, not the machine's core count.
      character_coverage, split_digits: passed to sentencepiece.
      flags: how the inputs are read (reader, max_doc_bytes, text key).

    Returns:
      Path of the `.model` file. Special ids: pad=0, unk=1, bos=2, eos=3.

    Normalization is the identity and whitespace is kept as is (no NFKC, no collapsing of
    spaces), so code indentation and any Unicode survive encoding exactly.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 4 + (256 if byte_fallback else 0) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small (4 specials"
                         f"{' + 256 byte pieces' if byte_fallback else ''} + at least one piece)")
    model_prefix = dio.require_local(model_prefix, "model_prefix", "a sentencepiece model")
    texts = sample_documents(inputs, sample_docs, seed, flags)
    if not texts:
        raise ValueError(f"no valid documents to train a tokenizer on in {list(inputs)}")
    chunks = [c for t in texts for c in _training_chunks(t)]
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    log.info("training %s tokenizer (vocab %d) on %d documents, %d chunks",
             model_type, vocab_size, len(texts), len(chunks))
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        # In memory, not model_prefix=...: the trainer would record the prefix (a path)
        # inside the model, so the same training written elsewhere would differ.
        model_writer=model_bytes,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=byte_fallback,
        character_coverage=character_coverage,
        split_digits=split_digits,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # indentation runs become single pieces
        max_sentence_length=TRAIN_CHUNK_BYTES,
        # We sampled already: use every chunk, in our order, so training is deterministic.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads,
        minloglevel=2,  # errors only; sentencepiece is very chatty at INFO
    )
    model_path = model_prefix + ".model"
    with open(model_path, "wb") as f:
        f.write(model_bytes.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    with open(model_prefix + ".vocab", "w", encoding="utf-8") as f:  # for people: piece<TAB>score
        for i in range(sp.vocab_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    return model_path


# ----------------------------------------------------------------------------- encoding

_worker_sp = None


def _worker_init(model_path: str) -> None:
    """Each worker loads the model itself (a SentencePieceProcessor is not shared across processes)."""
    global _worker_sp
    import sentencepiece as spm

    _worker_sp = spm.SentencePieceProcessor(model_file=model_path, num_threads=1)


def _encode_texts(texts: list[str]) -> list[bytes]:
    """Token ids of each text as little-endian uint32 bytes (a shard record)."""
    ids = _worker_sp.encode(texts, out_type=int, num_threads=1)
    return [np.asarray(x, dtype="<u4").tobytes() for x in ids]


class _ShardWriter:
    """One ArrayRecord shard plus its per-record token counts and per-source counts."""

    def __init__(self, output_dir: str, split: str, index: int, count: int):
        from array_record.python import array_record_module

        self.name = f"{split}-{index:05d}-of-{count:05d}"
        self.split = split
        self.path = os.path.join(output_dir, self.name + ".array_record")
        self._writer = array_record_module.ArrayRecordWriter(self.path, SHARD_OPTIONS)
        self.lengths: list[int] = []
        self.sources: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    def write(self, record: bytes, source: str) -> None:
        self._writer.write(record)
        n = len(record) // 4
        self.lengths.append(n)
        self.sources[source][0] += 1
        self.sources[source][1] += n

    def close(self) -> dict:
        self._writer.close()
        lengths_file = self.name + ".lengths.npy"
        np.save(os.path.join(os.path.dirname(self.path), lengths_file),
                np.asarray(self.lengths, dtype="<u4"))
        return {
            "path": os.path.basename(self.path),
            "split": self.split,
            "lengths": lengths_file,
            "documents": len(self.lengths),
            "tokens": int(sum(self.lengths)),
            "sources": {s: {"documents": d, "tokens": t} for s, (d, t) in sorted(self.sources.items())},
        }


def _num_eval_shards(num_shards: int, eval_fraction: float) -> int:
    return 0 if eval_fraction <= 0 else max(1, math.ceil(num_shards * eval_fraction))


def encode_to_shards(
    inputs: Sequence[str],
    output_dir: str,
    tokenizer: str,
    num_shards: int = 8,
    eval_fraction: float = 0.01,
    workers: int | None = None,
    *,
    chunk_docs: int = 256,
    split_by: str = "id",
    flags: R.InputFlags = R.InputFlags(),
) -> dict:
    """Encodes documents into ArrayRecord token shards and writes manifest.json.

    Args:
      inputs: files, globs, directories or URLs of documents (JSONL, Parquet, WET, ...: `readers`).
        A record that cannot be read, or has empty text, is set aside in errors.jsonl.
      output_dir: a local directory (or file:// URL), created if missing; shard files of an
        earlier run in it are removed.
      tokenizer: path of a sentencepiece .model; copied to `output_dir/tokenizer.model`.
      num_shards: number of train shards. Eval gets ceil(num_shards * eval_fraction)
        shards (at least 1 when eval_fraction > 0).
      eval_fraction: share of documents held out, chosen by a hash of `id` (`split_by`). If none
        falls in eval but there are >= 2 documents, the one with the smallest hash is
        moved to eval, so a small corpus still has an eval split.
      workers: encoding processes (default: all cores); <= 1 encodes in this process.
        Results are consumed in input order, so the output does not depend on it.
        Workers are spawned (not forked), so a script calling this with workers > 1
        needs the usual `if __name__ == "__main__":` guard.
      chunk_docs: documents per task sent to a worker.
      split_by: the document field whose hash chooses the split: "id" (each document on
        its own) or a grouping field, e.g. the demo corpus's "group", so that documents
        sharing text (a module's code and its rendered docs) land on the same side. A
        document without the field is split by its id.
      flags: how the inputs are read (reader, max_doc_bytes, text key).

    Returns:
      The manifest (also written to `output_dir/manifest.json`); see `_build_manifest`.
    """
    import sentencepiece as spm

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    output_dir = dio.require_local(output_dir, "output_dir", "token shards (ArrayRecord)")
    shards_in = flags.plan(inputs)
    workers = (os.cpu_count() or 1) if workers is None else workers
    os.makedirs(output_dir, exist_ok=True)
    # Remove what an earlier run left (e.g. with another shard count): the manifest
    # first, so an interrupted run never leaves a manifest naming missing shards.
    for name in [MANIFEST] + sorted(os.listdir(output_dir)):
        if name == MANIFEST or _SHARD_FILE_RE.match(name):
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))

    # Self-contained output: the model travels with the shards.
    model_path = os.path.join(output_dir, TOKENIZER_FILE)
    copied_from = None
    if not (os.path.exists(model_path) and os.path.samefile(tokenizer, model_path)):
        shutil.copyfile(tokenizer, model_path)
        copied_from = tokenizer
    sp = spm.SentencePieceProcessor(model_file=model_path)
    if sp.eos_id() < 0:
        raise ValueError(f"{tokenizer}: the model has no EOS piece; the loader needs one to separate documents")

    num_eval = _num_eval_shards(num_shards, eval_fraction)
    writers = {
        "train": [_ShardWriter(output_dir, "train", i, num_shards) for i in range(num_shards)],
        "eval": [_ShardWriter(output_dir, "eval", i, num_eval) for i in range(num_eval)],
    }
    errors: list[dict] = []
    dropped: collections.Counter = collections.Counter()
    docs_per_input: collections.Counter = collections.Counter()
    errors_per_input: collections.Counter = collections.Counter()

    def put(split: str, doc: dict, record: bytes) -> None:
        ws = writers[split]
        ws[_shard_of(doc["id"], len(ws))].write(record, doc["source"])

    # Routing. A document goes to eval iff split_key(id) < eval_fraction. Fallback for
    # small corpora: while no eval document has been seen, the train document with the
    # smallest key is held back instead of written; if the input ends with no eval
    # document, it becomes the eval document. Memory: one document.
    held: tuple[float, dict, bytes] | None = None
    eval_seen = 0

    def route(doc: dict, record: bytes) -> None:
        nonlocal held, eval_seen
        key = split_key(doc["split"])
        if key < eval_fraction:
            eval_seen += 1
            put("eval", doc, record)
            if held is not None:
                put("train", held[1], held[2])
                held = None
        elif num_eval and not eval_seen and (held is None or key < held[0]):
            if held is not None:
                put("train", held[1], held[2])
            held = (key, doc, record)
        else:
            put("train", doc, record)

    def batches() -> Iterator[tuple[list[dict], list[str]]]:
        metas: list[dict] = []
        texts: list[str] = []
        for shard in shards_in:
            before = len(errors)
            for _, doc in _iter_documents([shard], errors, dropped):
                docs_per_input[shard.name] += 1
                split = doc.get(split_by)
                metas.append({"id": doc["id"], "source": doc.get("source") or "unknown",
                              "split": split if isinstance(split, str) else doc["id"]})
                texts.append(doc["text"])
                if len(metas) >= chunk_docs:
                    yield metas, texts
                    metas, texts = [], []
            errors_per_input[shard.name] += len(errors) - before
        if metas:
            yield metas, texts

    if workers <= 1:
        _worker_init(model_path)
        for metas, texts in batches():
            for doc, rec in zip(metas, _encode_texts(texts)):
                route(doc, rec)
    else:
        # spawn: safe even when the parent runs threads (grain, jax); fork would copy their locks.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_worker_init, initargs=(model_path,)) as pool:
            # apply_async with a bounded window, not imap: imap would read the whole input
            # ahead into memory. Taking results from the left keeps input order.
            pending: collections.deque = collections.deque()
            for metas, texts in batches():
                pending.append((metas, pool.apply_async(_encode_texts, (texts,))))
                while len(pending) > 4 * workers or (pending and pending[0][1].ready()):
                    metas_done, res = pending.popleft()
                    for doc, rec in zip(metas_done, res.get()):
                        route(doc, rec)
            while pending:
                metas_done, res = pending.popleft()
                for doc, rec in zip(metas_done, res.get()):
                    route(doc, rec)
    if held is not None:  # no eval document was seen
        num_docs = sum(docs_per_input.values())
        put("eval" if num_docs >= 2 else "train", held[1], held[2])

    shards = [w.close() for split in ("train", "eval") for w in writers[split]]
    # Always written (empty when the input is clean), so its absence is never ambiguous.
    dio.write_jsonl(os.path.join(output_dir, ERRORS), errors)
    manifest = _build_manifest(
        inputs=[s.name for s in shards_in], shards=shards, errors=errors, dropped=dropped,
        docs_per_input=docs_per_input, errors_per_input=errors_per_input, sp=sp,
        model_path=model_path, copied_from=copied_from, eval_fraction=eval_fraction, split_by=split_by,
    )
    tmp = os.path.join(output_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, os.path.join(output_dir, MANIFEST))  # last: a manifest means a complete output
    log.info("%d records in: wrote %d documents, %d tokens to %s; %d set aside",
             manifest["documents_in"], manifest["documents"], manifest["tokens"], output_dir, len(errors))
    return manifest


def _split_rule(split_by: str) -> str:
    if split_by == "id":
        return ("eval iff int(blake2b(id, digest_size=16)[:8], big-endian) / 2**64 < eval_fraction"
                " (if none and >= 2 documents: the smallest); shard = int(digest[8:]) % shards")
    return (f"eval iff int(blake2b({split_by} (id when absent), digest_size=16)[:8], big-endian) / 2**64"
            " < eval_fraction (if none and >= 2 documents: the smallest);"
            " shard = int(blake2b(id, digest_size=16)[8:]) % shards")


def _build_manifest(*, inputs, shards, errors, dropped, docs_per_input, errors_per_input, sp, model_path,
                    copied_from, eval_fraction, split_by="id") -> dict:
    """The manifest.json contents. Sorted, count-only, no timestamps: deterministic."""
    splits: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    for sh in shards:
        sp_ = splits.setdefault(sh["split"], {"documents": 0, "tokens": 0, "shards": 0})
        sp_["documents"] += sh["documents"]
        sp_["tokens"] += sh["tokens"]
        sp_["shards"] += 1
        for name, c in sh["sources"].items():
            src = sources.setdefault(name, {"documents": 0, "tokens": 0})
            src["documents"] += c["documents"]
            src["tokens"] += c["tokens"]
            per_split = src.setdefault(sh["split"], {"documents": 0, "tokens": 0})
            per_split["documents"] += c["documents"]
            per_split["tokens"] += c["tokens"]
    tokenizer = {
        "path": TOKENIZER_FILE,  # relative to the manifest's directory
        "sha256": sha256_file(model_path),
        "vocab_size": sp.vocab_size(),
    }
    if copied_from is not None:
        tokenizer["copied_from"] = copied_from
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tokenizer": tokenizer,
        "vocab_size": sp.vocab_size(),
        "pad_id": sp.pad_id(),
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "dtype": "<u4",
        "eos_appended": False,
        "bos_prepended": False,
        "eval_fraction": eval_fraction,
        "split_rule": _split_rule(split_by),
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        # every record read: documents_in = documents_out + sum(dropped) + errors.count
        "documents_in": sum(s["documents"] for s in shards) + sum(dropped.values()) + len(errors),
        "documents_out": sum(s["documents"] for s in shards),
        "dropped": dict(sorted(dropped.items())),
        "splits": splits,
        "sources": dict(sorted(sources.items())),
        "shards": shards,
        "inputs": [{"path": p, "documents": docs_per_input[p], "errors": errors_per_input[p]} for p in inputs],
        "errors": {
            "count": len(errors),
            "path": ERRORS,
            "kinds": dict(sorted(collections.Counter(e["kind"] for e in errors).items())),
        },
    }


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `danlu tokenize`."""
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="documents: files, globs, directories or URLs (JSONL, Parquet, WET; see --reader)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="local output directory of shards + manifest.json (write locally, then copy to a bucket)")
    parser.add_argument("--model", metavar="PATH", help="existing sentencepiece .model; if omitted, "
                        "one is trained first into DIR/tokenizer.model")
    parser.add_argument("--train-model", action="store_true",
                        help="train a model (the default when --model is not given)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--sample-docs", type=int, default=100_000,
                        help="documents sampled (by a hash of id) to train the tokenizer")
    parser.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                        help="map unknown characters to <unk> instead of UTF-8 byte pieces")
    parser.add_argument("--train-threads", type=int, default=8,
                        help="sentencepiece trainer threads (the model depends on this number)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokenizer's document sample")
    parser.add_argument("--num-shards", type=int, default=8, help="train shards")
    parser.add_argument("--eval-fraction", type=float, default=0.01)
    parser.add_argument("--split-by", default="id",
                        help="document field whose hash picks train or eval: id, or a grouping field (e.g. group)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    R.add_input_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Runs `danlu tokenize`; returns the exit code (2: bad flags or inputs, before any work)."""
    if args.model and args.train_model:
        print("danlu tokenize: error: give either --model or --train-model, not both", file=sys.stderr)
        return 2
    flags = R.InputFlags.from_args(args)
    try:
        out = dio.require_local(args.output, "--output", "token shards (ArrayRecord)")
        flags.plan(args.input)  # a missing input or a bad flag stops here, before training
    except ValueError as e:
        print(f"danlu tokenize: error: {e}", file=sys.stderr)
        return 2
    try:
        model = args.model
        if not model:
            model = train_tokenizer(
                args.input, os.path.join(out, "tokenizer"), vocab_size=args.vocab_size,
                model_type=args.model_type, byte_fallback=args.byte_fallback,
                sample_docs=args.sample_docs, seed=args.seed, num_threads=args.train_threads, flags=flags,
            )
            print(f"trained {model}")
        manifest = encode_to_shards(args.input, out, model, num_shards=args.num_shards,
                                    eval_fraction=args.eval_fraction, workers=args.workers,
                                    split_by=args.split_by, flags=flags)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"danlu tokenize: error: {e}", file=sys.stderr)
        return 1
    s = manifest["splits"]
    print(f"{manifest['documents_in']} records in, {manifest['documents_out']} documents out, "
          f"{sum(manifest['dropped'].values())} dropped, {manifest['errors']['count']} set aside -> "
          f"{os.path.join(out, ERRORS)}")
    print(f"{manifest['tokens']} tokens (train {s.get('train', {}).get('documents', 0)} docs / "
          f"{s.get('train', {}).get('tokens', 0)} tokens, eval {s.get('eval', {}).get('documents', 0)} docs / "
          f"{s.get('eval', {}).get('tokens', 0)} tokens), vocab {manifest['vocab_size']}")
    print(f"wrote {os.path.join(out, MANIFEST)}")
    return 0
