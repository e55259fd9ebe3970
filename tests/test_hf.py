"""Hugging Face interop: golden logits against transformers (torch CPU, fp32, eager attention)
both ways, for LLaMA (RoPE, GQA, tied/untied, biases) and GPT-2 (learned positions, LayerNorm,
fused c_attn, tied/untied, zero biases); import -> danlu train continues; the tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pretrain.config import ConfigError, ModelConfig, load_config  # noqa: E402
from pretrain.generate import load_checkpoint  # noqa: E402
from pretrain.hf import export_hf, hf_family, import_hf, model_config_from_hf, write_run  # noqa: E402

RTOL = 1e-4


def init_params(m: ModelConfig, seed: int) -> dict:
    """Random parameters in the layout of pretrain/model.py's Decoder, drawn with numpy (compiling
    the model's own init takes seconds): weights N(0, init_std), norm scales 1 + N(0, 0.05),
    biases N(0, 0.05), so that the mapping of norms and biases matters."""
    import jax
    from flax import nnx

    from pretrain.model import init_model

    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = path[-1].key
        mean, std = (1.0, 0.05) if name == "scale" else (0.0, 0.05) if name.endswith("bias") else (0.0, m.init_std)
        return (mean + std * rng.standard_normal(x.shape)).astype(x.dtype)

    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: init_model(m, 0))))
    return jax.tree_util.tree_map_with_path(draw, abstract)


def danlu_logits(params: dict, m: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    """fp32 logits [B, T, V] of pretrain/model.py's Decoder with these parameters."""
    import jax
    from flax import nnx

    from pretrain.model import init_model
    from pretrain.train import merge_model

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(m, 0)))

    @jax.jit
    def logits(params, tokens):
        model = merge_model(graphdef, abstract, params)
        return model(tokens) @ model.unembedding()

    return np.asarray(logits(params, tokens))


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err < RTOL, f"max |danlu - transformers| / max |transformers| = {err:.2e}"


HF_MODELS = {
    "llama-gqa-untied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, max_position_embeddings=64, rope_theta=500.0,
        rms_norm_eps=1e-5, initializer_range=0.2, attn_implementation="eager")),
    "llama-mha-tied-bias": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, attention_bias=True, mlp_bias=False,
        max_position_embeddings=64, initializer_range=0.2, attn_implementation="eager")),
    "gpt2-tied": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
        bos_token_id=2, eos_token_id=3, attn_implementation="eager")),
    "gpt2-untied": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_inner=80, n_positions=64, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, attn_implementation="eager")),
}


def _randomize_biases(model) -> None:
    """HF initializes biases (and LayerNorm) to 0/1; random values make the test see their mapping."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("name", HF_MODELS)
def test_import_and_export_match_transformers(name, tmp_path):
    torch.manual_seed(0)
    hf = HF_MODELS[name]().eval()
    _randomize_biases(hf)
    hf.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(0).integers(0, 96, (2, 24))
    theirs = hf_logits(hf, tokens)

    import_hf(tmp_path / "hf", tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 0
    assert hf_family(ckpt.cfg.model) == name.split("-")[0]
    ours = danlu_logits(ckpt.params, ckpt.cfg.model, tokens)
    assert_close(ours, theirs)

    export_hf(tmp_path / "run", tmp_path / "out")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert_close(ours, hf_logits(back.eval(), tokens))
    # The round trip is exact: the same tensors come back.
    for key, value in hf.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key].numpy(), value.numpy(), err_msg=key)


DANLU_MODELS = {
    # RoPE + GQA + tied embeddings, LLaMA-style
    "llama-gqa-tied": ModelConfig(vocab_size=80, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=96,
                                  max_seq_len=64, tie_embeddings=True, rope_theta=1000.0, init_std=0.1),
    # multi-query with biases (attention_bias + mlp_bias)
    "llama-mqa-bias": ModelConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=64,
                                  max_seq_len=64, use_bias=True, init_std=0.1),
    # GPT-2 family without biases: exported with zero biases
    "gpt2-nobias-untied": ModelConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                      norm="layernorm", position="learned", mlp="gelu", use_bias=False, init_std=0.1),
}


@pytest.mark.parametrize("name", DANLU_MODELS)
def test_export_of_danlu_model_matches_transformers(name, tmp_path):
    m = DANLU_MODELS[name]
    params = init_params(m, 1)  # non-trivial norms and biases, so that their mapping matters
    cfg = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in vars(m).items()] + ["data.seq_len=32"])
    write_run(tmp_path / "run", cfg, params)
    summary = export_hf(tmp_path / "run", tmp_path / "out")
    assert summary["family"] == name.split("-")[0]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = np.random.default_rng(1).integers(0, 80, (3, 40))
    assert_close(danlu_logits(params, m, tokens), hf_logits(hf.eval(), tokens))


def test_export_bfloat16(tmp_path):
    torch.manual_seed(0)
    HF_MODELS["llama-gqa-untied"]().save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "out", dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("changes, message", [
    ({"qk_norm": True}, "model.qk_norm=true"),
    ({"norm": "layernorm"}, "model.norm=layernorm (LLaMA needs rmsnorm)"),
    ({"mlp": "gelu"}, "model.mlp=gelu (LLaMA needs swiglu)"),
    ({"position": "learned", "norm": "layernorm", "mlp": "gelu", "n_kv_heads": 2}, "model.n_kv_heads=2"),
    ({"position": "learned", "norm": "layernorm"}, "model.mlp=swiglu (GPT-2 needs gelu)"),
])
def test_inexpressible_models_are_refused(changes, message):
    m = ModelConfig(**{"vocab_size": 64, "d_model": 32, "n_heads": 4, **changes})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf_family(m)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1, "vocab_size": 64, "activation_function": "gelu"},
     "activation_function='gelu'"),
    ({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 64,
      "intermediate_size": 64, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
    ({"model_type": "mistral"}, "model_type='mistral' is not supported"),
])
def test_import_refuses_what_danlu_cannot_compute(config, message):
    with pytest.raises(ConfigError, match=message):
        model_config_from_hf(config)


def test_import_then_train_continues_from_the_weights(shards, tmp_path):
    """import-hf -> danlu train: the run resumes at step 0 and its first loss is the imported model's loss."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pretrain.data import make_train_iterator
    from pretrain.loss import cross_entropy
    from pretrain.model import init_model
    from pretrain.train import merge_model, train

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    import_hf(tmp_path / "hf", run, overrides=["data.seq_len=32"])
    imported = load_checkpoint(run)
    overrides = [f"data.path={shards}", "train.steps=2", "train.global_batch_size=8", "optimizer.warmup_steps=0",
                 "data.eval_batches=0", "logging.tensorboard=false", "logging.log_every=1", "train.eval_every=0"]
    cfg = load_config(run / "config.yaml", overrides)
    assert cfg.train.run_dir == str(run.absolute())
    logs: list[str] = []
    summary = train(cfg, log=logs.append)
    assert any("resumed from" in line and "step 0" in line for line in logs), logs
    assert summary["steps"] == 2

    batch = next(make_train_iterator(cfg.data, 8, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(cfg.model, 0)))

    @jax.jit
    def loss(params, batch):
        model = merge_model(graphdef, abstract, params)
        hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        ce, _ = cross_entropy(hidden, model.unembedding(), batch["targets"], batch["segment_ids"] > 0)
        return ce / jnp.sum(batch["segment_ids"] > 0)

    expected = float(loss(imported.params, batch))
    assert summary["first_loss"] == pytest.approx(expected, rel=1e-5)
    # The weights moved: the final checkpoint is not the imported one.
    trained = load_checkpoint(run)
    assert trained.step == 2
    assert not np.allclose(jax.device_get(trained.params["embed"]), jax.device_get(imported.params["embed"]))

    # Export the trained run: the tokenizer of its shards goes along, and transformers reads it
    # as sentencepiece does.
    export_hf(run, tmp_path / "out")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(shards / "tokenizer.model"))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    texts = ["def f(x):\n    return x  # two  spaces\n", "  leading spaces and ünïcödé 中文 😀", "x", "1234 + 56\n\n\tend"]
    for text in texts:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (sp.eos_id(), sp.bos_id(), sp.pad_id())


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_json_matches_sentencepiece_on_a_corpus(shards, kind, tmp_path):
    """tokenizer.json, rebuilt from the sentencepiece model, encodes a real corpus identically."""
    import sentencepiece as spm

    from danlu.base.fs import read_jsonl
    from data_pipeline.tokenize import train_tokenizer
    from pretrain.hf import sentencepiece_to_tokenizers

    corpus = shards.parent / "corpus.jsonl"
    model = str(shards / "tokenizer.model") if kind == "bpe" else train_tokenizer(
        [str(corpus)], str(tmp_path / "uni"), vocab_size=600, model_type="unigram", sample_docs=200)
    sp, tok = spm.SentencePieceProcessor(model_file=model), sentencepiece_to_tokenizers(model)
    texts = [doc["text"][:3000] for doc in read_jsonl(str(corpus))][:40] + ["  two  spaces\n\tTab", "ünïcödé 中文 😀"]
    for text in texts:
        assert tok.encode(text).ids == sp.encode(text)
        assert tok.decode(sp.encode(text)) == text
