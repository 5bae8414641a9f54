"""Llama-family decoder: Hugging Face parity, KV cache, soft prefix, SmolLM2 GGUF, tokenizer, errors."""

import functools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plug_jax import llm
from plug_jax.models import assets, layers, llama
from plug_jax.models.loading import CheckpointError
from plug_jax.models.chat import ChatTemplate
from plug_jax.models.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Right-padded batch: full row, two shorter rows.
LENGTHS = (10, 7, 4)


def padded_batch(rng: np.random.Generator, vocab_size: int, lengths=LENGTHS, width: int = 10):
    tokens = rng.integers(3, vocab_size, size=(len(lengths), width)).astype(np.int32)
    mask = np.arange(width)[None, :] < np.array(lengths)[:, None]
    return tokens, mask


def hf_positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


# ---------------------------------------------------------------------------------------------
# a. Round trip through save_pretrained.

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, rms_norm_eps=1e-5, initializer_range=0.2)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
HF_VARIANTS = {
        "llama_untied_gqa": lambda: transformers.LlamaConfig(
                **_COMMON, num_key_value_heads=2, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
        "llama_tied_biases_llama3_rope": lambda: transformers.LlamaConfig(
                **_COMMON, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                rope_parameters=_LLAMA3_ROPE),
        "qwen2_qkv_biases": lambda: transformers.Qwen2Config(
                **_COMMON, num_key_value_heads=1, tie_word_embeddings=False),
}


def save_hf_model(config, directory) -> "torch.nn.Module":
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # biases and norm scales start at 0 and 1: randomize so that loading them matters
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_matches_transformers_after_save_pretrained(variant, tmp_path):
    hf_model = save_hf_model(HF_VARIANTS[variant](), tmp_path)
    config, params = llama.load_llama(tmp_path, dtype=jnp.float32)
    assert config.num_kv_heads == hf_model.config.num_key_value_heads
    assert config.tie_word_embeddings == ("lm_head" not in params)

    tokens, mask = padded_batch(np.random.default_rng(0), config.vocab_size)
    ours, _ = llama.Llama(config).apply({"params": params}, tokens, mask)
    with torch.no_grad():
        reference = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             position_ids=torch.from_numpy(hf_positions(mask))).logits.numpy()
    difference = np.abs(np.asarray(ours) - reference)[mask].max()
    print(f"{variant}: max |logit difference| = {difference:.2e} (logit scale {np.abs(reference).max():.1f})")
    assert difference <= 1e-4


def test_attention_dropout_acts_where_transformers_puts_it(tmp_path, keep_every_unit):
    """Llama's only dropout, on the attention probabilities: with masks that keep every unit,
    train mode scales them by 1/(1 - rate), in ours as in transformers'."""
    del keep_every_unit
    hf_config = HF_VARIANTS["llama_untied_gqa"]()
    hf_config.attention_dropout = 0.25
    hf_model = save_hf_model(hf_config, tmp_path).train()
    config, params = llama.load_llama(tmp_path, dtype=jnp.float32)
    tokens, mask = padded_batch(np.random.default_rng(0), config.vocab_size)
    with torch.no_grad():
        reference = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             position_ids=torch.from_numpy(hf_positions(mask))).logits.numpy()
    model = llama.Llama(config, dropout_rate=0.25)
    ours, _ = model.apply({"params": params}, tokens, mask, deterministic=False,
                          rngs={"dropout": jax.random.key(0)})
    assert np.abs(np.asarray(ours) - reference)[mask].max() <= 1e-4
    deterministic, _ = model.apply({"params": params}, tokens, mask)
    assert np.abs(np.asarray(deterministic) - reference)[mask].max() > 1e-2


def test_attention_dropout_acts_in_train_mode_only_and_follows_its_rng(tiny):
    config, params = tiny
    tokens, mask = padded_batch(np.random.default_rng(1), config.vocab_size)

    def logits(rate, rng=None):  # train mode with remat: `deterministic` is a static argument
        train_mode = {} if rng is None else dict(deterministic=False, rngs={"dropout": rng})
        model = llama.Llama(config, dropout_rate=rate, remat=rng is not None)
        apply = jax.jit(model.apply, static_argnames="deterministic")
        return apply({"params": params}, tokens, mask, **train_mode)[0][mask]

    expected = logits(0.0)
    np.testing.assert_array_equal(logits(0.0, jax.random.key(1)), expected)
    np.testing.assert_array_equal(logits(0.1), expected)
    dropped = logits(0.1, jax.random.key(1))
    np.testing.assert_array_equal(logits(0.1, jax.random.key(1)), dropped)
    assert np.abs(dropped - expected).max() > 1e-3
    assert np.abs(logits(0.1, jax.random.key(2)) - dropped).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# b, c. Cache and soft prefix, on a tiny random model.


@pytest.fixture(scope="module")
def tiny():
    config = llama.LlamaConfig.tiny()
    return config, llama.init_params(config, jax.random.key(0))


def test_abstract_params_match_init(tiny):
    config, params = tiny
    abstract = llama.abstract_params(config, jnp.bfloat16)
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert all(a.shape == p.shape and a.dtype == jnp.bfloat16
               for a, p in zip(jax.tree.leaves(abstract), jax.tree.leaves(params)))
    axes = llama.param_logical_axes(config)
    assert tuple(axes["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["layers_0"]["self_attn"]["k_proj"]["kernel"]) == ("embed", "kv_heads")


def test_padding_in_the_middle_is_invisible(tiny):
    config, params = tiny
    model = llama.Llama(config)
    tokens, _ = padded_batch(np.random.default_rng(1), config.vocab_size, lengths=(10,))
    mask = np.ones_like(tokens, bool)
    mask[0, 3:6] = False
    gapped, _ = model.apply({"params": params}, tokens, mask)
    compact, _ = model.apply({"params": params}, tokens[:, mask[0]], np.ones((1, mask.sum()), bool))
    np.testing.assert_allclose(np.asarray(gapped)[mask], np.asarray(compact)[0], atol=1e-5)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_cached_decoding_matches_full_forward(tiny, with_prefix):
    config, params = tiny
    model = llama.Llama(config)
    rng = np.random.default_rng(2)
    prompt, prompt_mask = padded_batch(rng, config.vocab_size, lengths=(6, 4, 1), width=6)
    continuation = rng.integers(3, config.vocab_size, size=(3, 4)).astype(np.int32)
    prefix_kwargs = {}
    if with_prefix:  # two soft tokens after the first token, the second of them masked out
        prefix = jax.random.normal(jax.random.key(3), (3, 2, config.hidden_size))
        prefix_kwargs = dict(embedded_prefix=prefix, prefix_mask=np.array([[True, False]] * 3), insert_at=1)
    prefix_length = 2 if with_prefix else 0

    full_tokens = np.concatenate([prompt, continuation], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(continuation, bool)], axis=1)
    expected, _ = model.apply({"params": params}, full_tokens, full_mask, **prefix_kwargs)

    apply = jax.jit(model.apply, static_argnames="insert_at")
    cache = llama.init_cache(config, 3, prompt.shape[1] + prefix_length + continuation.shape[1])
    logits, cache = apply({"params": params}, prompt, prompt_mask, cache=cache, **prefix_kwargs)
    steps = [logits]
    for t in range(continuation.shape[1]):
        logits, cache = apply({"params": params}, continuation[:, t:t + 1], np.ones((3, 1), bool),
                              cache=cache)
        steps.append(logits)
    cached = np.concatenate(steps, axis=1)

    valid = np.asarray(llama.splice_prefix(jnp.zeros((*full_mask.shape, 1)), jnp.asarray(full_mask),
                                           jnp.zeros((3, prefix_length, 1)),
                                           prefix_kwargs.get("prefix_mask"), 1)[1])
    np.testing.assert_allclose(cached[valid], np.asarray(expected)[valid], atol=1e-5)
    np.testing.assert_array_equal(cache["index"], [full_mask.shape[1] + prefix_length] * 3)
    np.testing.assert_array_equal(cache["position"], valid.sum(axis=1))
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(cache))


@pytest.mark.parametrize("insert_at", [0, 3])
def test_soft_prefix_equals_the_tokens_it_embeds(tiny, insert_at):
    config, params = tiny
    model = llama.Llama(config)
    rng = np.random.default_rng(4)
    tokens, mask = padded_batch(rng, config.vocab_size, lengths=(8, 5), width=8)
    soft_ids = rng.integers(3, config.vocab_size, size=(2, 3)).astype(np.int32)
    embedded = params["embed_tokens"]["embedding"][soft_ids]

    spliced, _ = model.apply({"params": params}, tokens, mask, embedded_prefix=embedded, insert_at=insert_at)
    inline_tokens = np.concatenate([tokens[:, :insert_at], soft_ids, tokens[:, insert_at:]], axis=1)
    inline_mask = np.concatenate([mask[:, :insert_at], np.ones_like(soft_ids, bool), mask[:, insert_at:]],
                                 axis=1)
    inline, _ = model.apply({"params": params}, inline_tokens, inline_mask)
    assert spliced.shape == (2, 8 + 3, config.vocab_size)
    np.testing.assert_allclose(np.asarray(spliced)[inline_mask], np.asarray(inline)[inline_mask], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# d. SmolLM2-135M-Instruct from its Q4_1 GGUF, against transformers' own GGUF loading.

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return assets.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return llama.load_llama(smollm2_path, dtype=jnp.float32)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_chat(smollm2_path, smollm2_tokenizer):
    return ChatTemplate.from_gguf(smollm2_path, smollm2_tokenizer)


@pytest.fixture(scope="module")
def hf_smollm2_tokenizer(smollm2_path):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


def test_smollm2_logits_match_transformers(smollm2_path, smollm2, smollm2_chat):
    config, params = smollm2
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
            str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32,
            attn_implementation="eager").eval()
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert config.tie_word_embeddings and config.rope_theta == hf_model.config.rope_parameters["rope_theta"]

    ids = smollm2_chat.prompt_ids(QUESTION)
    tokens = np.array([ids, ids[:20] + [config.pad_id] * (len(ids) - 20)], np.int32)
    mask = np.arange(len(ids))[None, :] < np.array([[len(ids)], [20]])
    ours, _ = jax.jit(llama.Llama(config).apply)({"params": params}, tokens, mask)
    with torch.no_grad():
        reference = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             position_ids=torch.from_numpy(hf_positions(mask))).logits.numpy()
    difference = np.abs(np.asarray(ours) - reference)[mask].max()
    print(f"SmolLM2-135M-Instruct (Q4_1 dequantized, f32): max |logit difference| = {difference:.2e} "
          f"over {mask.sum()} positions (logit scale {np.abs(reference).max():.1f})")
    assert difference <= 1e-3


def test_smollm2_greedy_answers_paris(smollm2, smollm2_tokenizer, smollm2_chat):
    config, params = smollm2
    # Two prompts of different lengths: the shorter one is right-padded and must continue from its
    # own last token.
    prompts = [smollm2_chat.prompt_ids(question) for question in (QUESTION, "Capital of Japan?")]
    width = max(map(len, prompts))
    tokens = np.array([p + [config.pad_id] * (width - len(p)) for p in prompts], np.int32)
    mask = np.array([[True] * len(p) + [False] * (width - len(p)) for p in prompts])
    lm = llm.DecoderOnlyLM(llama.Llama(config), smollm2_chat)
    assert lm.eos_id == config.eos_id
    greedy = jax.jit(functools.partial(lm.generate, method="greedy", max_new_tokens=16))
    generated = greedy(params, None, {"tokens": tokens, "mask": mask})
    answers = [smollm2_tokenizer.decode(np.asarray(row)) for row in generated]
    print(f"SmolLM2 greedy: {answers}")
    assert "Paris" in answers[0] and "Tokyo" in answers[1]


def test_smollm2_bfloat16_agrees_with_float32(smollm2, smollm2_chat):
    config, params = smollm2
    ids = smollm2_chat.prompt_ids(QUESTION)
    tokens, mask = np.array([ids], np.int32), np.ones((1, len(ids)), bool)
    full, _ = jax.jit(llama.Llama(config).apply)({"params": params}, tokens, mask)
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    model16 = llama.Llama(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    half, _ = jax.jit(model16.apply)({"params": params16}, tokens, mask)
    assert half.dtype == jnp.float32
    agreement = float(jnp.mean(half.argmax(-1) == full.argmax(-1)))
    print(f"bfloat16 vs float32: max |logit difference| = {float(jnp.abs(half - full).max()):.2f}, "
          f"top-1 agreement {agreement:.2f}")
    assert agreement >= 0.9


def _dot_count(jaxpr) -> int:
    return sum(eqn.primitive.name == "dot_general" for eqn in jaxpr.eqns) + sum(
        _dot_count(sub.jaxpr if isinstance(sub, jax.extend.core.ClosedJaxpr) else sub)
        for eqn in jaxpr.eqns for param in eqn.params.values()
        for sub in (param if isinstance(param, (tuple, list)) else (param,))
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)))


@pytest.mark.parametrize("spec, a_shape, b_shape", [
    ("...k,kn->...n", (4, 5, 64), (64, 32)),                   # Dense, the tied LM head
    ("bqkgd,bskd->bkgqs", (2, 7, 3, 2, 16), (2, 9, 3, 16)),    # attention logits
    ("bkgqs,bskd->bqkgd", (2, 3, 2, 7, 9), (2, 9, 3, 16))])    # attention-weighted values
def test_low_precision_einsum_is_the_float32_product_and_skips_a_frozen_operands_gradient(
        spec, a_shape, b_shape):
    keys = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(keys[0], a_shape).astype(jnp.bfloat16)
    b = jax.random.normal(keys[1], b_shape).astype(jnp.bfloat16)
    out, vjp = jax.vjp(functools.partial(layers.low_precision_einsum, spec), a, b)
    grad = jax.random.normal(keys[2], out.shape).astype(jnp.bfloat16)
    exact, exact_vjp = jax.vjp(functools.partial(jnp.einsum, spec), a.astype(jnp.float32),
                               b.astype(jnp.float32))
    for ours, reference in zip((out, *vjp(grad)), (exact, *exact_vjp(grad.astype(jnp.float32)))):
        assert ours.dtype == jnp.bfloat16 and ours.shape == reference.shape
        # the float32 sum rounded to bf16 once: within a bf16 ulp (sums may differ in order)
        np.testing.assert_allclose(np.asarray(ours, np.float32), reference, rtol=2 ** -7,
                                   atol=1e-5)

    def loss(a, b):
        return layers.low_precision_einsum(spec, a, b).astype(jnp.float32).sum()

    # The forward product, plus one per operand differentiated: a frozen kernel costs none.
    assert _dot_count(jax.make_jaxpr(jax.grad(loss))(a, b).jaxpr) == 2
    assert _dot_count(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b).jaxpr) == 3
    with pytest.raises(TypeError, match="operands of bfloat16 and float32"):
        layers.low_precision_einsum(spec, a, b.astype(jnp.float32))


TEXTS = [
        "Hello world!",
        "Café crème brûlée, naïve résumé — “quotes” élan",
        "日本語のテキストも大丈夫ですか？",
        "emoji 🙂🚀👍🏽 mixed with text",
        "Numbers 2024, 3.14159 and x86_64; tabs\tand\nnewlines\n\nend.",
        "I'm sure they'll've done it, ain't they?",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nRésumé en français, s'il vous plaît: "
        "日本<|im_end|>\n<|im_start|>assistant\n",
]


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2_tokenizer, hf_smollm2_tokenizer):
    for text in TEXTS:
        ours = smollm2_tokenizer.encode(text)
        assert ours == hf_smollm2_tokenizer(text, add_special_tokens=False).input_ids, text
        assert smollm2_tokenizer.decode(ours, skip_special=False) == text
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(TEXTS[6])) == "user\nhi\n"
    assert (smollm2_tokenizer.vocab_size, smollm2_tokenizer.bos_id, smollm2_tokenizer.eos_id,
            smollm2_tokenizer.pad_id) == (49152, 1, 2, 2)
    # Deliberate difference: SmolLM2 was trained with every digit split off before the GPT-2 regex
    # (llama.cpp's "smollm" pre-tokenizer does the same); transformers' GGUF converter drops that
    # step, which only matters for whitespace runs right before a digit.
    spaces = smollm2_tokenizer.token_to_id("ĠĠ")
    assert smollm2_tokenizer.encode("  1") == [spaces, smollm2_tokenizer.token_to_id("1")]


# ---------------------------------------------------------------------------------------------
# e. Errors: one line, naming what is wrong.


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    save_hf_model(HF_VARIANTS["llama_untied_gqa"](), directory)
    return directory


def _rewrite_checkpoint(source, target, edit_tensors=None, edit_config=None):
    from safetensors.numpy import load_file, save_file

    target.mkdir()
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    save_file(edit_tensors(tensors) if edit_tensors else tensors, target / "model.safetensors")
    (target / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    return target


def _one_line_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        llama.load_llama(path, dtype=jnp.float32)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = _rewrite_checkpoint(tiny_checkpoint, tmp_path / "ckpt",
                               edit_tensors=lambda t: {k: v for k, v in t.items() if k != name})
    _one_line_error(path, name, "missing")


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    name = "model.norm.weight"
    path = _rewrite_checkpoint(tiny_checkpoint, tmp_path / "ckpt",
                               edit_tensors=lambda t: {**t, name: np.ones(33, np.float32)})
    _one_line_error(path, name, "(33,)")


def test_unknown_architecture_is_named(tiny_checkpoint, tmp_path):
    path = _rewrite_checkpoint(
            tiny_checkpoint, tmp_path / "ckpt",
            edit_config=lambda c: {**c, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    _one_line_error(path, "gpt_neox", str(path))


def test_unknown_gguf_architecture_names_file(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _one_line_error(path, str(path), "'gpt2'")


def test_unreadable_file_is_one_line(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    _one_line_error(path, str(path), "GGUF")


def _write_gguf(path, vocab):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(vocab)
    writer.add_float32("llama.rope.freq_base", 10000.5)
    writer.add_tensor("token_embd.weight", np.zeros((len(vocab), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_metadata_is_parsed_once_then_read_from_the_cache_until_the_file_changes(
        tmp_path, monkeypatch):
    import gguf as gguf_package

    from plug_jax.models import gguf

    monkeypatch.setenv("PLUG_JAX_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    _write_gguf(path, ["a", "b", "é"])
    reader = gguf_package.GGUFReader(str(path))
    expected = {name: field.contents() for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    parsed = gguf.read_metadata(path)
    assert parsed == {**expected, "tensor_names": ["token_embd.weight"]}
    assert parsed["llama.rope.freq_base"] == 10000.5
    assert len(list((tmp_path / "cache" / "gguf").glob("model-*.json"))) == 1

    gguf._read_metadata.cache_clear()  # a new process: the JSON, not the reader
    gguf._open_reader.cache_clear()
    monkeypatch.setattr(gguf_package, "GGUFReader", None)
    assert gguf.read_metadata(path) == parsed

    monkeypatch.undo()  # the file rewritten: parsed again, into a new cache entry
    monkeypatch.setenv("PLUG_JAX_CACHE_DIR", str(tmp_path / "cache"))
    _write_gguf(path, ["a", "b", "c", "d"])
    os.utime(path, ns=(0, 10**18))
    assert gguf.read_metadata(path)["tokenizer.ggml.tokens"] == ["a", "b", "c", "d"]
    assert len(list((tmp_path / "cache" / "gguf").glob("model-*.json"))) == 2


def test_gguf_metadata_without_a_writable_cache(tmp_path, monkeypatch):
    from plug_jax.models import gguf

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PLUG_JAX_CACHE_DIR", str(tmp_path / "file"))  # not a directory
    path = tmp_path / "model.gguf"
    _write_gguf(path, ["x", "y"])
    assert gguf.read_metadata(path)["tokenizer.ggml.tokens"] == ["x", "y"]
