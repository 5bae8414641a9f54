"""The frozen-LLM adapters: where soft tokens go, what the loss covers, and that they steer."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from plug_jax import errors, llm as llm_lib

REVIEW = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
          "3, 4, or 5 without further explanation. review: This album is a pleasant listen with a "
          "few strong songs.")


def _arrays(features):
    return {name: jnp.asarray(value) for name, value in features.items()}


def _jit_apply(lm):
    """The LLM module's apply as one program (eager, each op would compile on its own)."""
    return jax.jit(lm.module.apply, static_argnames=("insert_at",))


def test_decoder_only_loss_covers_exactly_the_answer_tokens():
    lm, params = llm_lib.load_llm("tiny-llama")
    features = lm.featurize(["What is 2+2?", "Say hi"], ["4", "hi there"], max_input_tokens=32,
                            max_target_tokens=4, length=48)
    batch = _arrays(features)
    soft = jax.random.normal(jax.random.key(1), (2, 2, lm.width)) * 0.2
    loss_sum, count = jax.jit(lm.loss)(params, soft, batch)

    # By hand: full logits, soft slots removed, next-token NLL at the answer's positions.
    logits, _ = _jit_apply(lm)({"params": params}, batch["tokens"], batch["mask"],
                               embedded_prefix=soft, insert_at=lm.insert_at)
    logits = np.concatenate([logits[:, :lm.insert_at], logits[:, lm.insert_at + 2:]], axis=1)
    logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    expected, tokens_counted = 0.0, 0
    for row, answer in enumerate(["4", "hi there"]):
        answer_ids = lm.tokenizer.encode(answer) + [lm.eos_id]
        prompt_length = int(features["mask"][row].sum()) - len(answer_ids)
        ids = features["tokens"][row]
        np.testing.assert_array_equal(ids[prompt_length:prompt_length + len(answer_ids)],
                                      answer_ids)
        for j in range(len(answer_ids)):
            expected -= logprobs[row, prompt_length - 1 + j, ids[prompt_length + j]]
            tokens_counted += 1
    assert float(count) == tokens_counted
    assert float(loss_sum) == pytest.approx(expected, rel=1e-5)


def test_the_shared_header_runs_once_with_the_loss_gradient_and_prefill_of_the_full_forward():
    lm, params = llm_lib.load_llm("tiny-llama")
    features = lm.featurize(["What is 2+2?", "Say hi", "A longer question for the third row"],
                            ["4", "hi there", "yes"], max_input_tokens=32, max_target_tokens=4,
                            length=48)
    batch = _arrays(features)
    soft = jax.random.normal(jax.random.key(2), (3, 2, lm.width)) * 0.2

    def full_forward_loss(soft):  # every row runs its own header
        logits, _ = lm.module.apply({"params": params}, batch["tokens"], batch["mask"],
                                    embedded_prefix=soft, insert_at=lm.insert_at,
                                    logit_positions=batch["target_positions"] + 2)
        return jnp.sum(llm_lib._example_nll(logits, batch["targets"], batch["target_mask"])[0])

    def loss(soft):
        return lm.loss(params, soft, batch)[0]

    np.testing.assert_allclose(jax.jit(loss)(soft), jax.jit(full_forward_loss)(soft), rtol=1e-5)
    grads = {name: jax.jit(jax.grad(fn)).lower(soft).compile()
             for name, fn in (("shared", loss), ("full", full_forward_loss))}
    np.testing.assert_allclose(grads["shared"](soft), grads["full"](soft), rtol=1e-4, atol=1e-6)
    assert grads["shared"].cost_analysis()["flops"] < grads["full"].cost_analysis()["flops"]

    prompts = _arrays(lm.featurize(["What is 2+2?", "Say hi", "Hello"], None, max_input_tokens=32,
                                   max_target_tokens=4, length=40))
    logits, cache = jax.jit(lm.prefill, static_argnames="max_new_tokens")(params, soft, prompts,
                                                                          max_new_tokens=3)
    full, _ = _jit_apply(lm)({"params": params}, prompts["tokens"], prompts["mask"],
                             embedded_prefix=soft, insert_at=lm.insert_at)
    last = prompts["mask"].sum(axis=1) - 1 + 2
    np.testing.assert_allclose(logits, full[np.arange(3), last], rtol=1e-4, atol=1e-5)
    assert cache["key_mask"].shape == (3, 40 + 2 + 3)
    assert int(cache["index"][0]) == 40 + 2


def test_soft_tokens_go_after_the_chat_header():
    lm, _ = llm_lib.load_llm("tiny-llama")
    header = lm.tokenizer.decode(lm.featurize(["x"], None, max_input_tokens=8, max_target_tokens=1,
                                              length=48)["tokens"][0][:lm.insert_at],
                                 skip_special=False)
    assert header.endswith("<|im_start|>user\n")
    start = dataclasses.replace(lm, soft_token_position="start")
    assert start.insert_at == 0
    with pytest.raises(ValueError, match="soft_token_position"):
        dataclasses.replace(lm, soft_token_position="middle")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
@pytest.mark.usefixtures("sharp_tiny_t5")
def test_label_scoring_equals_the_loss_of_each_label_as_the_answer(name):
    """label_nll runs the prompt once and feeds each label through the cache; it must give the
    training loss of the same answer, per example, labels of different token lengths included."""
    lm, params = llm_lib.load_llm(name)
    labels = ["1", "5", "based on a book"]
    inputs = [REVIEW, "Which tag? A boy wizard goes to school."]
    soft = jax.random.normal(jax.random.key(3), (2, 2, lm.width)) * 0.5
    prompts = _arrays(lm.featurize(inputs, None, max_input_tokens=64, max_target_tokens=8,
                                   length=96))
    label_ids, label_mask = lm.label_ids(labels)
    scored = np.asarray(jax.jit(lm.label_nll)(params, soft, prompts, label_ids, label_mask))
    assert scored.shape == (2, 3)
    for column, label in enumerate(labels):
        answers = _arrays(lm.featurize(inputs, [label] * 2, max_input_tokens=64,
                                       max_target_tokens=8, length=112))
        nll, _ = jax.jit(lm.example_nll)(params, soft, answers)
        np.testing.assert_allclose(scored[:, column], np.asarray(nll), rtol=2e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
@pytest.mark.usefixtures("sharp_tiny_t5")
def test_soft_tokens_change_the_generated_output(name):
    lm, params = llm_lib.load_llm(name)
    batch = _arrays(lm.featurize([REVIEW] * 2, None, max_input_tokens=64, max_target_tokens=4,
                                 length=96))
    generate = jax.jit(functools.partial(lm.generate, method="greedy", max_new_tokens=4))
    plain = np.asarray(generate(params, None, batch))
    soft = jax.random.normal(jax.random.key(0), (2, 2, lm.width)) * 3.0
    steered = np.asarray(generate(params, soft, batch))
    np.testing.assert_array_equal(plain[0], plain[1])
    assert not np.array_equal(plain, steered)


@pytest.mark.usefixtures("sharp_tiny_t5")
def test_attention_implementations_compute_the_same():
    """config.llm.attention_impl changes how attention runs, not what it computes: T5's loss (its
    per-head relative-position biases, padding and causal masks, no scaling) and its gradient by
    the soft tokens are the same with jax.nn.dot_product_attention as with our einsums. (Llama's
    loss: tests/test_bench.py, through the update; BERT's gradients: tests/test_bert.py.)"""
    soft = jax.random.normal(jax.random.key(0), (2, 2, 32))
    results = []
    for impl in ("einsum", "xla"):
        lm, params = llm_lib.build_llm(ml_collections.ConfigDict(dict(
            path="tiny-t5", dtype="float32", soft_token_position="start", remat=False,
            attention_impl=impl)))
        batch = _arrays(lm.featurize([REVIEW, "Which tag? A boy wizard."], ["4", "fantasy"],
                                     max_input_tokens=64, max_target_tokens=4, length=96))
        results.append(jax.jit(jax.value_and_grad(lambda s: lm.loss(params, s, batch)[0]))(soft))
    (einsum_loss, einsum_grad), (loss, grad) = results
    np.testing.assert_allclose(loss, einsum_loss, rtol=1e-5)
    # Gradients up to 0.2: float32 sums in another order move the smallest ones by ~1e-6.
    np.testing.assert_allclose(grad, einsum_grad, rtol=1e-4, atol=1e-5)


def test_attention_implementation_is_checked():
    def build(**fields):
        llm_lib.build_llm(ml_collections.ConfigDict({
            "path": "tiny-llama", "dtype": "float32", "soft_token_position": "start",
            "remat": False, **fields}))

    with pytest.raises(errors.ConfigError, match="attention_impl 'flash'"):
        build(attention_impl="flash")
    with pytest.raises(errors.ConfigError, match="'cudnn' runs bfloat16 or float16 only"):
        build(attention_impl="cudnn")
    if jax.default_backend() != "gpu":
        with pytest.raises(errors.ConfigError, match="'cudnn' needs an NVIDIA GPU"):
            build(attention_impl="cudnn", dtype="bfloat16")


@pytest.fixture(scope="module")
def smollm2():
    return llm_lib.load_llm("smollm2")


def test_smollm2_soft_token_after_the_header_steers_but_not_at_position_zero(smollm2):
    """The measured reason for the default position: at slot 0 a soft token sits in the model's
    attention sink; after the chat header, the same optimisation moves the answer's likelihood
    much further (measured: target NLL 2.6 -> 1.28 after the header, -> 2.07 at slot 0)."""
    lm, params = smollm2
    # Greedy decoding's first token is the argmax of the prompt's last logits.
    zero_shot, _ = lm.prefill(params, None, _arrays(lm.featurize(
        [REVIEW], None, max_input_tokens=96, max_target_tokens=2, length=96)), 1)
    assert lm.tokenizer.decode([int(np.argmax(zero_shot[0]))]).startswith("1")  # SmolLM2 says 1

    start_vector = lm.embedding_table(params)[jnp.array(lm.tokenizer.encode(" "))][None]
    losses = {}
    for position in ("after_chat_header", "start"):
        placed = dataclasses.replace(lm, soft_token_position=position)
        batch = _arrays(placed.featurize([REVIEW], ["5"], max_input_tokens=96, max_target_tokens=2,
                                         length=96))
        optimizer = optax.adam(0.05)

        @jax.jit
        def step(llm_params, soft, opt_state, placed=placed, batch=batch):
            """The update, and the loss of `soft` before it."""
            loss, grad = jax.value_and_grad(
                lambda s: jnp.divide(*placed.loss(llm_params, s, batch)))(soft)
            updates, opt_state = optimizer.update(grad, opt_state)
            return optax.apply_updates(soft, updates), opt_state, loss

        soft, opt_state = start_vector, optimizer.init(start_vector)
        for _ in range(10):
            soft, opt_state, loss = step(params, soft, opt_state)
            losses.setdefault(position + " before", float(loss))  # the loss of start_vector
        losses[position] = float(step(params, soft, opt_state)[2])  # after 10 updates
    print(losses)
    assert losses["after_chat_header"] < losses["after_chat_header before"] - 0.8
    assert losses["after_chat_header"] < losses["start"] - 0.4
