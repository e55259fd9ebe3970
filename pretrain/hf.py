"""Hugging Face interop: `danlu export-hf` and `danlu import-hf`.

Two families, chosen by the model config:

LLaMA (``LlamaForCausalLM``): model.position=rope, norm=rmsnorm, mlp=swiglu. Our RoPE is the
  "rotate half" layout HF Llama uses, so q/k weights need no permutation. ``model.n_kv_heads``
  maps to ``num_key_value_heads`` (GQA/MQA), ``head_dim`` is written explicitly, ``model.use_bias``
  to ``attention_bias`` + ``mlp_bias``, ``tie_embeddings`` to ``tie_word_embeddings``.
GPT-2 (``GPT2LMHeadModel``): model.position=learned, norm=layernorm, mlp=gelu, n_kv_heads =
  n_heads, head_dim · n_heads = d_model. HF's Conv1D stores weights [in, out] (our layout) and
  fuses q, k, v into ``c_attn``; our GELU is the tanh approximation, ``activation_function:
  gelu_new``. Biases our config lacks (use_bias=false) are written as zeros (exact).

Anything else (qk-norm, LayerNorm with RoPE, ...) is refused with the option to change.

Parameters go out as ``model.safetensors`` (float32 or bfloat16) beside ``config.json`` and
``generation_config.json``. The tokenizer is our sentencepiece model: ``tokenizer.model`` as is,
plus ``tokenizer.json`` (the same model rebuilt for the `tokenizers` library: BPE merges or unigram
scores, byte fallback, sentencepiece's whitespace handling) and ``tokenizer_config.json``, so
``AutoTokenizer`` loads it without converting (for either family: there are no GPT-2 BPE files,
the vocabulary is ours). No BOS is added, as in training.

Import reads ``config.json`` + safetensors (single file or sharded with an index) of a LLaMA or
GPT-2 model and writes a run directory: ``config.yaml`` (defaults or ``--config PRESET`` with the
model section from HF) and ``checkpoints/0`` (the weights, a fresh optimizer state, step 0), so
`danlu train OUT/config.yaml data.path=SHARDS` continues pretraining from the imported weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from pretrain.config import ConfigError, ModelConfig

# Fields of ModelConfig that decide the parameters' shapes and the function they compute.
ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len",
               "norm", "norm_eps", "position", "rope_theta", "mlp", "tie_embeddings", "qk_norm", "use_bias")


# ---------------------------------------------------------------------------------------------
# Which HF family a model config maps to


def hf_family(m: ModelConfig) -> str:
    """'llama' or 'gpt2'; raises ConfigError naming the option that neither format can express."""
    if m.qk_norm:
        raise ConfigError("model.qk_norm=true has no equivalent in LlamaForCausalLM or GPT2LMHeadModel; "
                          "export needs a model trained with model.qk_norm=false")
    if m.position == "rope":
        wrong = [f"model.{k}={getattr(m, k)} (LLaMA needs {v})" for k, v in (("norm", "rmsnorm"), ("mlp", "swiglu"))
                 if getattr(m, k) != v]
        if wrong:
            raise ConfigError(f"model.position=rope exports as LlamaForCausalLM, which cannot express {', '.join(wrong)}")
        return "llama"
    wrong = [f"model.{k}={getattr(m, k)} (GPT-2 needs {v})" for k, v in (("norm", "layernorm"), ("mlp", "gelu"))
             if getattr(m, k) != v]
    if m.n_kv_heads != m.n_heads:
        wrong.append(f"model.n_kv_heads={m.n_kv_heads} (GPT-2 has no grouped-query attention: needs n_heads={m.n_heads})")
    if m.head_dim * m.n_heads != m.d_model:
        wrong.append(f"model.head_dim={m.head_dim} (GPT-2 needs d_model / n_heads = {m.d_model // m.n_heads})")
    if wrong:
        raise ConfigError(f"model.position=learned exports as GPT2LMHeadModel, which cannot express {', '.join(wrong)}")
    return "gpt2"


def _layer(blocks: dict, i: int) -> dict:
    return {k: (_layer(v, i) if isinstance(v, dict) else np.asarray(v[i])) for k, v in blocks.items()}


def to_hf_tensors(params: dict, m: ModelConfig) -> dict[str, np.ndarray]:
    """danlu parameters (pure dict, layers stacked) -> HF state dict (numpy, float32, HF layouts)."""
    family = hf_family(m)
    p = {k: v for k, v in params.items() if k != "blocks"}
    f32 = lambda a: np.asarray(a, np.float32)
    d, n, k, h = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
    out: dict[str, np.ndarray] = {}
    if family == "llama":
        out["model.embed_tokens.weight"] = f32(p["embed"])
        for i in range(m.n_layers):
            b, pre = _layer(params["blocks"], i), f"model.layers.{i}."
            a, mlp = b["attn"], b["mlp"]
            out[pre + "self_attn.q_proj.weight"] = f32(a["q"]).reshape(d, n * h).T
            out[pre + "self_attn.k_proj.weight"] = f32(a["k"]).reshape(d, k * h).T
            out[pre + "self_attn.v_proj.weight"] = f32(a["v"]).reshape(d, k * h).T
            out[pre + "self_attn.o_proj.weight"] = f32(a["o"]).reshape(n * h, d).T
            out[pre + "mlp.gate_proj.weight"] = f32(mlp["gate"]).T
            out[pre + "mlp.up_proj.weight"] = f32(mlp["up"]).T
            out[pre + "mlp.down_proj.weight"] = f32(mlp["down"]).T
            if m.use_bias:
                for name in ("q", "k", "v", "o"):
                    out[pre + f"self_attn.{name}_proj.bias"] = f32(a[f"{name}_bias"]).reshape(-1)
                for name in ("gate", "up", "down"):
                    out[pre + f"mlp.{name}_proj.bias"] = f32(mlp[f"{name}_bias"])
            out[pre + "input_layernorm.weight"] = f32(b["attn_norm"]["scale"])
            out[pre + "post_attention_layernorm.weight"] = f32(b["mlp_norm"]["scale"])
        out["model.norm.weight"] = f32(p["final_norm"]["scale"])
    else:
        out["transformer.wte.weight"] = f32(p["embed"])
        out["transformer.wpe.weight"] = f32(p["pos_embed"])

        def norm(prefix: str, q: dict) -> None:
            out[prefix + ".weight"] = f32(q["scale"])
            out[prefix + ".bias"] = f32(q["bias"]) if "bias" in q else np.zeros(d, np.float32)

        bias = lambda q, name, size: f32(q[name]).reshape(-1) if name in q else np.zeros(size, np.float32)
        for i in range(m.n_layers):
            b, pre = _layer(params["blocks"], i), f"transformer.h.{i}."
            a, mlp = b["attn"], b["mlp"]
            norm(pre + "ln_1", b["attn_norm"])
            out[pre + "attn.c_attn.weight"] = np.concatenate([f32(a[x]).reshape(d, d) for x in "qkv"], axis=1)
            out[pre + "attn.c_attn.bias"] = np.concatenate([bias(a, f"{x}_bias", d) for x in "qkv"])
            out[pre + "attn.c_proj.weight"] = f32(a["o"]).reshape(d, d)
            out[pre + "attn.c_proj.bias"] = bias(a, "o_bias", d)
            norm(pre + "ln_2", b["mlp_norm"])
            out[pre + "mlp.c_fc.weight"] = f32(mlp["up"])
            out[pre + "mlp.c_fc.bias"] = bias(mlp, "up_bias", m.d_ff)
            out[pre + "mlp.c_proj.weight"] = f32(mlp["down"])
            out[pre + "mlp.c_proj.bias"] = bias(mlp, "down_bias", d)
        norm("transformer.ln_f", p["final_norm"])
    if not m.tie_embeddings:
        out["lm_head.weight"] = f32(p["unembed"]).T
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def hf_config(m: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None,
              dtype: str = "float32") -> dict:
    """config.json contents for the model's family."""
    import transformers

    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    common = {"vocab_size": m.vocab_size, "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
              "dtype": dtype, "use_cache": True, "transformers_version": transformers.__version__, **ids}
    if hf_family(m) == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": m.d_model,
                "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
                "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
                "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
                "rope_theta": m.rope_theta,  # for transformers < 5
                "attention_bias": m.use_bias, "mlp_bias": m.use_bias, "attention_dropout": 0.0,
                "pretraining_tp": 1, **common}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": m.d_model, "n_layer": m.n_layers,
            "n_head": m.n_heads, "n_inner": m.d_ff, "n_positions": m.max_seq_len, "n_ctx": m.max_seq_len,
            "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps, "resid_pdrop": 0.0,
            "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, **common}


# ---------------------------------------------------------------------------------------------
# The tokenizer: sentencepiece -> tokenizers (tokenizer.json)


def _proto_fields(buf: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of one protobuf message; enough of the wire format to read
    a few fields of a sentencepiece ModelProto without its generated classes (whose protobuf
    version pins often clash)."""
    out, i = [], 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            byte = buf[i]
            i += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value: object = varint()
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size = varint()
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((field, wire, value))
    return out


def _spm_specs(model_bytes: bytes) -> dict:
    """model_type (1 unigram, 2 bpe, ...), normalizer name and whitespace flags of a sentencepiece model."""
    spec = {"model_type": 1, "name": "nmt_nfkc", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
            "escape_whitespaces": True, "split_by_whitespace": True, "allow_whitespace_only_pieces": False,
            "treat_whitespace_as_suffix": False, "has_charsmap": False}
    for field, _, value in _proto_fields(model_bytes):
        if field == 2:  # TrainerSpec
            for f, _, v in _proto_fields(value):
                key = {3: "model_type", 24: "treat_whitespace_as_suffix", 26: "allow_whitespace_only_pieces",
                       29: "split_by_whitespace"}.get(f)
                if key:
                    spec[key] = v if key == "model_type" else bool(v)
        elif field == 3:  # NormalizerSpec
            for f, _, v in _proto_fields(value):
                if f == 1:
                    spec["name"] = v.decode()
                elif f == 2:
                    spec["has_charsmap"] = len(v) > 0
                elif f in (3, 4, 5):
                    spec[{3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}[f]] = bool(v)
    return spec


def sentencepiece_to_tokenizers(model_path: str):
    """A `tokenizers.Tokenizer` that encodes and decodes like the sentencepiece model at ``model_path``.

    Supported: BPE and unigram models with identity normalization (what `danlu tokenize` trains),
    byte fallback, the dummy-prefix space, whitespace-only pieces. Raises ValueError otherwise.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    data = Path(model_path).read_bytes()
    spec = _spm_specs(data)
    if spec["name"] not in ("identity",) and spec["has_charsmap"]:
        raise ValueError(f"{model_path}: normalization rule {spec['name']!r} is not supported for tokenizer.json "
                         f"(only 'identity', which `danlu tokenize` uses)")
    if spec["treat_whitespace_as_suffix"] or not spec["escape_whitespaces"] or not spec["split_by_whitespace"]:
        raise ValueError(f"{model_path}: whitespace options {spec} are not supported for tokenizer.json")
    sp = spm.SentencePieceProcessor(model_proto=data)
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    unk = sp.unk_id()
    if spec["model_type"] == 2:
        vocab = {p: i for i, p in enumerate(pieces)}
        # sentencepiece BPE merges the adjacent pair whose concatenation scores highest; scores
        # fall with the id, so a merge's rank is the id of the piece it makes.
        merges = []
        for piece, rank in vocab.items():
            if sp.is_control(rank) or sp.is_unknown(rank) or sp.is_byte(rank):
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((rank, vocab[left], vocab[right], left, right))
        merges = [(left, right) for *_, left, right in sorted(merges)]
        model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk] if unk >= 0 else None,
                           fuse_unk=True, byte_fallback=True)
    elif spec["model_type"] == 1:
        model = models.Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)], unk_id=unk if unk >= 0 else None,
                               byte_fallback=True)
    else:
        raise ValueError(f"{model_path}: sentencepiece model_type {spec['model_type']} (word/char) is not supported")
    tok = Tokenizer(model)
    norm = []
    if spec["remove_extra_whitespaces"]:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    # sentencepiece's SplitIntoWords: a word starts at the text's start or at a whitespace that
    # follows a non-whitespace (a run of whitespace stays with the word after it, when whitespace-
    # only pieces are allowed).
    word = Regex("▁*[^▁]+|▁+") if spec["allow_whitespace_only_pieces"] else Regex("▁?[^▁]+|▁")
    tok.pre_tokenizer = pre_tokenizers.Split(word, behavior="isolated")
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)])
    return tok


def write_tokenizer(model_path: str, out_dir: Path, max_len: int) -> dict:
    """tokenizer.model + tokenizer.json + tokenizer_config.json in ``out_dir``; returns special ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    sentencepiece_to_tokenizers(model_path).save(str(out_dir / "tokenizer.json"))
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(ids["bos"]),
              "eos_token": piece(ids["eos"]), "unk_token": piece(ids["unk"]), "pad_token": piece(ids["pad"]),
              "add_bos_token": False, "add_eos_token": False,  # danlu trains without BOS; EOS ends documents
              "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


# ---------------------------------------------------------------------------------------------
# Export


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
              dtype: str = "float32", tokenizer: str | None = None) -> dict:
    """Writes a Hugging Face model directory from a danlu checkpoint; returns a summary dict."""
    from safetensors.numpy import save_file

    from pretrain.generate import find_tokenizer, load_checkpoint

    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    ckpt = load_checkpoint(checkpoint, step)
    m = ckpt.cfg.model
    family = hf_family(m)  # refuse before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = find_tokenizer(ckpt, tokenizer)
    ids = {"bos": 2, "eos": 3, "pad": 0}  # data_pipeline/tokenize.py's fixed specials
    if tok_path is not None:
        ids = write_tokenizer(tok_path, out, m.max_seq_len)
    tensors = to_hf_tensors(ckpt.params, m)
    if dtype == "bfloat16":
        import ml_dtypes

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(m, bos_id=ids.get("bos"), eos_id=ids.get("eos"), pad_id=ids.get("pad"), dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return {"family": family, "step": ckpt.step, "out_dir": str(out), "tensors": len(tensors),
            "parameters": int(sum(v.size for v in tensors.values())), "tokenizer": tok_path, "dtype": dtype}


# ---------------------------------------------------------------------------------------------
# Import


def _read_hf_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({hf_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                                f"(convert .bin weights with transformers' save_pretrained(safe_serialization=True))")
    out: dict[str, np.ndarray] = {}
    for f in files:
        for name, a in load_file(str(f)).items():
            out[name] = np.asarray(a, np.float32)  # bf16/fp16 checkpoints are widened; danlu keeps fp32 params
    return out


def model_config_from_hf(config: dict, where: str = "config.json") -> ModelConfig:
    """danlu's ModelConfig for a HF LLaMA or GPT-2 config.json (dict); ConfigError if inexpressible."""
    kind = config.get("model_type")
    get = lambda key, default=None: config.get(key, default)
    if kind == "llama":
        if get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act={get('hidden_act')!r}; danlu's SwiGLU uses silu")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{where}: rope_type={rope_type!r} (RoPE scaling) is not supported; danlu implements "
                              f"plain RoPE (rope_type 'default')")
        n_heads = get("num_attention_heads")
        return ModelConfig(
            vocab_size=get("vocab_size"), d_model=get("hidden_size"), n_layers=get("num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=get("num_key_value_heads") or n_heads,
            head_dim=get("head_dim") or get("hidden_size") // n_heads, d_ff=get("intermediate_size"),
            max_seq_len=get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=get("rms_norm_eps", 1e-6),
            position="rope", rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))), mlp="swiglu",
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            use_bias=bool(get("attention_bias", False) or get("mlp_bias", False)),
            init_std=get("initializer_range", 0.02))
    if kind == "gpt2":
        act = get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ConfigError(f"{where}: activation_function={act!r}; danlu's GELU is the tanh approximation "
                              f"(gelu_new), so this model cannot be imported exactly")
        if not get("scale_attn_weights", True) or get("scale_attn_by_inverse_layer_idx", False):
            raise ConfigError(f"{where}: scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true is not "
                              f"supported (danlu scales attention by 1/sqrt(head_dim))")
        d, n = get("n_embd"), get("n_head")
        return ModelConfig(
            vocab_size=get("vocab_size"), d_model=d, n_layers=get("n_layer"), n_heads=n, n_kv_heads=n,
            head_dim=d // n, d_ff=get("n_inner") or 4 * d, max_seq_len=get("n_positions", 1024), norm="layernorm",
            norm_eps=get("layer_norm_epsilon", 1e-5), position="learned", mlp="gelu",
            tie_embeddings=bool(get("tie_word_embeddings", True)), use_bias=True,
            init_std=get("initializer_range", 0.02))
    raise ConfigError(f"{where}: model_type={kind!r} is not supported; import-hf reads 'llama' and 'gpt2'")


def from_hf_tensors(tensors: dict[str, np.ndarray], m: ModelConfig, where: str = "weights") -> dict:
    """HF state dict -> danlu parameters (pure dict, layers stacked; the layout of init_model(m))."""
    family = hf_family(m)
    d, n, k, h, layers = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.n_layers
    used: set[str] = set()

    def take(name: str, shape: tuple, default: float | None = None) -> np.ndarray:
        if name not in tensors:
            if default is not None:
                return np.full(shape, default, np.float32)
            raise ValueError(f"{where}: tensor {name!r} is missing")
        used.add(name)
        a = tensors[name]
        if a.shape != shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {a.shape}, expected {shape} from config.json")
        return a

    def stack(fn) -> np.ndarray:
        return np.stack([fn(i) for i in range(layers)])

    blocks: dict = {"attn": {}, "mlp": {}, "attn_norm": {}, "mlp_norm": {}}
    a, mlp = blocks["attn"], blocks["mlp"]
    f = m.d_ff
    if family == "llama":
        pre = "model.layers.{}."
        embed = take("model.embed_tokens.weight", (m.vocab_size, d))
        a["q"] = stack(lambda i: take(pre.format(i) + "self_attn.q_proj.weight", (n * h, d)).T.reshape(d, n, h))
        a["k"] = stack(lambda i: take(pre.format(i) + "self_attn.k_proj.weight", (k * h, d)).T.reshape(d, k, h))
        a["v"] = stack(lambda i: take(pre.format(i) + "self_attn.v_proj.weight", (k * h, d)).T.reshape(d, k, h))
        a["o"] = stack(lambda i: take(pre.format(i) + "self_attn.o_proj.weight", (d, n * h)).T.reshape(n, h, d))
        mlp["gate"] = stack(lambda i: take(pre.format(i) + "mlp.gate_proj.weight", (f, d)).T)
        mlp["up"] = stack(lambda i: take(pre.format(i) + "mlp.up_proj.weight", (f, d)).T)
        mlp["down"] = stack(lambda i: take(pre.format(i) + "mlp.down_proj.weight", (d, f)).T)
        if m.use_bias:  # a bias HF lacks (attention_bias without mlp_bias, say) is zero
            for name, shape in (("q", (n, h)), ("k", (k, h)), ("v", (k, h)), ("o", (d,))):
                a[f"{name}_bias"] = stack(lambda i: take(pre.format(i) + f"self_attn.{name}_proj.bias",
                                                         (math.prod(shape),), 0.0).reshape(shape))
            for name, size in (("gate", f), ("up", f), ("down", d)):
                mlp[f"{name}_bias"] = stack(lambda i: take(pre.format(i) + f"mlp.{name}_proj.bias", (size,), 0.0))
        blocks["attn_norm"]["scale"] = stack(lambda i: take(pre.format(i) + "input_layernorm.weight", (d,)))
        blocks["mlp_norm"]["scale"] = stack(lambda i: take(pre.format(i) + "post_attention_layernorm.weight", (d,)))
        params = {"embed": embed, "final_norm": {"scale": take("model.norm.weight", (d,))}}
    else:
        pre = "transformer.h.{}."
        embed = take("transformer.wte.weight", (m.vocab_size, d))
        qkv = [take(pre.format(i) + "attn.c_attn.weight", (d, 3 * d)) for i in range(layers)]
        qkv_b = [take(pre.format(i) + "attn.c_attn.bias", (3 * d,)) for i in range(layers)]
        for j, name in enumerate("qkv"):
            a[name] = np.stack([w[:, j * d:(j + 1) * d].reshape(d, n, h) for w in qkv])
            a[f"{name}_bias"] = np.stack([bb[j * d:(j + 1) * d].reshape(n, h) for bb in qkv_b])
        a["o"] = stack(lambda i: take(pre.format(i) + "attn.c_proj.weight", (d, d)).reshape(n, h, d))
        a["o_bias"] = stack(lambda i: take(pre.format(i) + "attn.c_proj.bias", (d,)))
        mlp["up"] = stack(lambda i: take(pre.format(i) + "mlp.c_fc.weight", (d, f)))
        mlp["up_bias"] = stack(lambda i: take(pre.format(i) + "mlp.c_fc.bias", (f,)))
        mlp["down"] = stack(lambda i: take(pre.format(i) + "mlp.c_proj.weight", (f, d)))
        mlp["down_bias"] = stack(lambda i: take(pre.format(i) + "mlp.c_proj.bias", (d,)))
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            blocks[ours] = {"scale": stack(lambda i: take(pre.format(i) + f"{theirs}.weight", (d,))),
                            "bias": stack(lambda i: take(pre.format(i) + f"{theirs}.bias", (d,)))}
        params = {"embed": embed, "pos_embed": take("transformer.wpe.weight", (m.max_seq_len, d)),
                  "final_norm": {"scale": take("transformer.ln_f.weight", (d,)), "bias": take("transformer.ln_f.bias", (d,))}}
    params["blocks"] = blocks
    if not m.tie_embeddings:
        params["unembed"] = take("lm_head.weight", (m.vocab_size, d)).T
    # Buffers some versions save (rotary inv_freq, GPT-2's causal mask) carry no parameters.
    unused = [t for t in tensors if t not in used and not t.endswith((".attn.bias", ".attn.masked_bias", "inv_freq"))
              and not (t == "lm_head.weight" and m.tie_embeddings)]
    if unused:
        raise ValueError(f"{where}: tensors {sorted(unused)[:8]} are not part of a {family} model with this config")
    return params


def _check_tree(params: dict, m: ModelConfig) -> dict:
    """Orders and checks ``params`` against the layout init_model(m) creates (same keys, same shapes)."""
    import jax
    from flax import nnx

    from pretrain.model import init_model

    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: init_model(m, 0))))

    def fill(path, leaf):
        node = params
        for key in path:
            node = node[key.key]
        if tuple(node.shape) != tuple(leaf.shape):
            raise ValueError(f"parameter {'/'.join(str(p.key) for p in path)}: shape {node.shape}, expected {leaf.shape}")
        return np.ascontiguousarray(node, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_config: str | None = None,
              overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """Writes a danlu run directory (config.yaml, checkpoints/0, tokenizer.model if HF has one)."""
    import jax

    from pretrain.config import load_config

    src, out = Path(hf_dir), Path(out_dir).absolute()
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (is it a Hugging Face model directory?)")
    hf_cfg = json.loads(cfg_path.read_text())
    m = model_config_from_hf(hf_cfg, str(cfg_path))
    params = from_hf_tensors(_read_hf_weights(src), m, str(src))
    # The imported architecture first, then the run directory, then the user's overrides.
    arch = [f"model.{k}={json.dumps(getattr(m, k))}" for k in ARCH_FIELDS] + [f"model.init_std={m.init_std}"]
    seq = [] if any(o.startswith("data.seq_len=") for o in overrides) else [f"data.seq_len={min(256, m.max_seq_len)}"]
    cfg = load_config(base_config, arch + seq + [f"train.run_dir={out}"] + list(overrides))
    changed = [k for k in ARCH_FIELDS if getattr(cfg.model, k) != getattr(m, k)]
    if changed:
        raise ConfigError(f"override of {', '.join('model.' + k for k in changed)} would change the imported "
                          f"architecture; only non-architecture model options (attention, remat, ...) may be set")
    write_run(out, cfg, params)
    tokenizer = None
    if (src / "tokenizer.model").is_file():
        shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
        tokenizer = str(out / "tokenizer.model")
    return {"family": hf_family(m), "out_dir": str(out), "config": str(out / "config.yaml"),
            "parameters": int(sum(np.size(v) for v in jax.tree.leaves(params))), "tokenizer": tokenizer}


def write_run(out_dir: str | os.PathLike, cfg, params: dict) -> Path:
    """A run directory `danlu train` resumes from: ``config.yaml`` and ``checkpoints/0`` holding
    ``params`` (pure dict in the init_model(cfg.model) layout), a fresh optimizer state, step 0."""
    import jax
    import jax.numpy as jnp

    from pretrain import checkpoint as ckpt_lib
    from pretrain.optimizer import make_optimizer
    from pretrain.train import TrainState

    out = Path(out_dir)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise FileExistsError(f"{out}/checkpoints is not empty; write into a new directory")
    params = jax.tree.map(jnp.asarray, _check_tree(params, cfg.model))
    out.mkdir(parents=True, exist_ok=True)
    optimizer, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       loss_history=jnp.full((cfg.train.spike_window,), jnp.nan, jnp.float32))
    manager = ckpt_lib.make_manager(out / "checkpoints", cfg.checkpoint)
    # The loader's state at step 0 is just the step (pretrain/data.py: TrainIterator).
    ckpt_lib.save(manager, 0, state, {"iterator": {"step": 0}, "skip": []}, cfg.to_dict(), force=True)
    manager.wait_until_finished()
    manager.close()
    (out / "config.yaml").write_text(cfg.to_yaml())
    return out


# ---------------------------------------------------------------------------------------------
# CLI: `danlu export-hf` (`danlu import-hf` is pretrain/hf_import.py, a second entry of the command table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or one checkpoints/STEP directory")
    parser.add_argument("out_dir", help="output directory (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the weights written")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the run's, see `danlu sample`)")


def main(args: argparse.Namespace) -> int:
    import sys

    try:
        s = export_hf(args.checkpoint, args.out_dir, step=args.step, dtype=args.dtype, tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"danlu export-hf: {e}", file=sys.stderr)
        return 2
    print(f"exported step {s['step']} as {s['family']} ({s['parameters']:,} parameters, {s['dtype']}) to {s['out_dir']}"
          + ("" if s["tokenizer"] else "; no tokenizer found (pass --tokenizer MODEL to include one)"))
    return 0
