"""Tests run on 8 simulated CPU devices; XLA_FLAGS must be set before jax is imported."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# The measured CPU peak (for MFU) is cached; keep the tests' measurement out of the user's cache.
if "DANLU_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["DANLU_CACHE_DIR"] = tempfile.mkdtemp(prefix="danlu-test-cache-")


import pytest  # noqa: E402  (after the environment above is set)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Token shards of a small real corpus (the demo corpus cut to 400 kB, a 512-piece tokenizer)."""
    from data_pipeline.demo_corpus import build_demo_corpus
    from data_pipeline.tokenize import encode_to_shards, train_tokenizer

    work = tmp_path_factory.mktemp("shards")
    corpus = work / "corpus.jsonl"
    build_demo_corpus(str(corpus), max_bytes=400_000)
    model = train_tokenizer([str(corpus)], str(work / "tok"), vocab_size=512)
    encode_to_shards([str(corpus)], str(work / "shards"), model, num_shards=2, eval_fraction=0.05, workers=1)
    return work / "shards"
