"""`configs/lampN.py:paper` is rucliujn/PPlug's recipe, and each option that makes it so behaves."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from plug_jax import plug, train
from plug_jax.data import grain_pipeline, lamp, pipeline
from plug_jax.models import bert

ENCODER = dataclasses.replace(bert.BertConfig.tiny(), vocab_size=64, max_position_embeddings=16)


def _paper_values(task):
    """Every value of the paper config that shapes the run, with the reference's value."""
    is_lamp3 = task == "LaMP_3"
    return {
        # code/run_all_t5.sh: --model_path ../FlanT5-XXL/ --emb_model_path ../bge-base-en-v1.5/
        # --bf16 True; ModelForPer.py: soft tokens replace the first two input tokens
        # "[INST_PER_TOKEN][SPC_PER_TOKEN]" + input (PersonalDataset_profile.py).
        "llm.path": "google/flan-t5-xxl",
        "llm.dtype": "bfloat16",
        "llm.soft_token_position": "start",
        "encoder.path": "BAAI/bge-base-en-v1.5",
        # ModelForPer.py obtain_task_emb: normalize(outputs[0][:, 0]), the CLS token;
        # embedding.py: history texts at the tokenizer's 512, CLS.
        "encoder.pooling": "cls",
        "encoder.max_length": 512,
        # PersonalDataset_profile.py __getitem__: the instruction, no space, then the query.
        "encoder.query_instruction": "Represent this sentence for searching relevant passages:",
        # run_all_t5.sh: --max_input_len 256 --max_his_len 512 --max_new_len ${len} (LaMP-3: 10);
        # PersonalDataset_profile.py: input tokens [:256][:-1] + EOS, targets at max_new_len,
        # query at max_input_len + 20, the last 512 history ids.
        "data.max_input_tokens": 256,
        "data.max_target_tokens": 10 if is_lamp3 else 128,
        "data.max_query_tokens": 276,
        "data.max_history": 512,
        "data.query_from": "truncated_input",  # process_qry(query) after the input's truncation
        "data.lamp1_query": "title",           # process_qry: between 'title "' and '",'
        "data.history_labels": False,          # embedding.py: the item's text fields alone
        # aggr_id.py: 10 copies of each example with > 2 items, int(n * U[0, 0.5)) + 1 dropped by
        # random.sample from the whole history.
        "data.augment_copies": 10,
        "data.augment_from": "all",
        # ModelForPer.py forward: profile * 539.9738, instruction / 7.0 * 539.9738; align_mlp is
        # Linear(768, d) GELU Linear(d, d); inst_token = torch.rand; nn.Linear default inits.
        "plug.soft_token_scale": "reference",
        "plug.soft_token_norm": 0.0,  # the LLM's mean token-embedding norm: ~539.97 for T5-XXL
        "plug.projector_hidden": 0,
        "plug.param_init": "torch",
        "plug.train_query_encoder": True,
        # aggr_id.py: softmax of the cosines as they are.
        "plug.attention_scale": 1.0,
        "plug.learn_attention_scale": False,
        # q only weighs the history: the LLM reads the input as text alone.
        "plug.input_tokens": 0,
        # Trainer in train mode: T5 dropout_rate 0.1, bge hidden/attention dropout 0.1.
        "plug.dropout": 0.1,
        "llm.dropout": 0.1,
        # run_all_t5.sh: --optim adamw_torch --learning_rate 1e-4 --weight_decay 1e-4
        # --warmup_ratio 0.05 --num_train_epochs ${epoch} (LaMP-3: 1), batch 2 x 8 accumulation
        # per GPU (64 in the paper); Trainer: linear schedule, warmup ceil(ratio * steps), decay
        # off biases and LayerNorms; dp.json has no gradient_clipping, so DeepSpeed clips nothing.
        "optim.lr": 1e-4,
        "optim.encoder_lr": 1e-4,
        "optim.weight_decay": 1e-4,
        "optim.weight_decay_mask": "no_bias_norm",
        "optim.warmup_fraction": 0.05,
        "optim.warmup_rounding": "ceil",
        "optim.batch_size": 64,
        "optim.epochs": 1.0 if is_lamp3 else 2.0,
        "optim.max_steps": 0,
        "optim.grad_clip": 0.0,
        # ModelForPer.py forward (eval): generate(num_beams=4, max_new_tokens=max_new_len).
        "decode.method": "beam",
        "decode.label_choice": "likeliest",  # beam search generates: no label is chosen
        "decode.num_beams": 4,
        "decode.max_new_tokens": 10 if is_lamp3 else 128,
    }


@pytest.mark.parametrize("task", ["LaMP_3", "LaMP_5"])
def test_paper_config_is_the_reference_recipe(task):
    config = common.lamp_config(task, "paper")
    actual = {}
    for name in _paper_values(task):
        group, field = name.split(".")
        actual[name] = config[group][field]
    assert actual == _paper_values(task)
    assert config.data.dir == f"data/{task}"


def test_other_configs_keep_our_defaults():
    config = common.lamp_config("LaMP_3", None)
    assert (config.plug.soft_token_scale, config.plug.param_init, config.data.augment_from,
            config.data.query_from, config.data.lamp1_query, config.optim.grad_clip,
            config.optim.weight_decay_mask, config.optim.warmup_rounding) == (
        "rms", "default", "recent", "input", "title_and_refs", 1.0, "all", "floor")
    assert config.plug.dropout == config.llm.dropout == 0.0
    assert (config.decode.method, config.decode.label_choice) == ("score", "median")
    assert common.lamp_config("LaMP_2", None).decode.label_choice == "likeliest"
    lamp4 = common.lamp_config("LaMP_4", None)
    assert (config.plug.input_tokens, lamp4.plug.input_tokens) == (1, 0)
    assert (config.data.augment_copies, lamp4.data.augment_copies) == (1, 0)
    assert (config.data.synthetic.examples_per_user, lamp4.data.synthetic.examples_per_user) == (2, 4)


# --------------------------------------------------------------------------------------------
# Soft tokens.


def _inputs(batch=2, history=4):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.integers(1, 64, (batch, 6)), jnp.int32), jnp.ones((batch, 6), bool),
            jnp.asarray(rng.normal(size=(batch, history, ENCODER.hidden_size)), jnp.float32),
            jnp.ones((batch, history), bool))


def _embedder(**fields):
    return plug.UserEmbedder(encoder_config=ENCODER, llm_width=24, soft_token_rms=0.7,
                             projector_hidden=16, **fields)


def test_reference_soft_token_scale_multiplies_by_constants():
    inputs = _inputs()
    reference = _embedder(soft_token_scale="reference", soft_token_norm=539.9738)
    params = nn.unbox(jax.jit(reference.init)(jax.random.key(0), *inputs))
    unscaled = _embedder(soft_token_scale="reference", soft_token_norm=1.0)
    soft = jax.jit(reference.apply)(params, *inputs)
    raw = jax.jit(unscaled.apply)(params, *inputs)
    np.testing.assert_allclose(soft, raw * 539.9738, rtol=1e-5)
    instruction = plug.ProjectorMLP(16, 24).apply(
        {"params": params["params"]["instruction_projector"]}, params["params"]["instruction"])
    np.testing.assert_allclose(raw[:, 0], np.broadcast_to(instruction / 7.0, (2, 24)), rtol=1e-5)
    # Not renormalized: the magnitude follows the projectors, so it is learnable.
    rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
    doubled = jax.tree.map(lambda x: x, params)
    fc2 = doubled["params"]["persona_projector"]["fc2"]
    fc2["kernel"], fc2["bias"] = fc2["kernel"] * 2, fc2["bias"] * 2
    doubled_soft = jax.jit(reference.apply)(doubled, *inputs)
    assert rms(doubled_soft[:, 1]) == pytest.approx(2 * rms(soft[:, 1]), rel=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(reference.apply(p, *inputs) ** 2)))(params)
    assert float(optax.tree.norm(grads["params"]["persona_projector"])) > 0
    # The rms scale pins every token's RMS instead.
    ours = jax.jit(_embedder().apply)(params, *inputs)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(ours ** 2, axis=-1)), 0.7, rtol=1e-4)


def test_reference_norm_comes_from_the_llm_unless_pinned():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(50, 16)) * 3.0, jnp.float32)
    mean_norm = float(jnp.mean(jnp.linalg.norm(table, axis=-1)))
    config = ml_collections.ConfigDict(dict(soft_token_scale="reference", soft_token_norm=0.0))
    fields = plug.soft_token_fields(config, table)
    assert fields["soft_token_norm"] == pytest.approx(mean_norm)
    assert fields["soft_token_rms"] == pytest.approx(plug.embedding_rms(table))
    config.soft_token_norm = 539.9738
    assert plug.soft_token_fields(config, table)["soft_token_norm"] == 539.9738


def test_torch_init_matches_the_reference_inits():
    init = jax.jit(_embedder(param_init="torch").init)
    params = nn.unbox(init(jax.random.key(0), *_inputs()))["params"]
    instruction = np.asarray(params["instruction"])
    assert instruction.min() >= 0.0 and instruction.max() < 1.0  # torch.rand
    kernel = np.asarray(params["persona_projector"]["fc1"]["kernel"])
    bound = 1 / math.sqrt(ENCODER.hidden_size)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.8 * bound
    bias = np.asarray(params["persona_projector"]["fc1"]["bias"])  # nn.Linear: U(-bound, bound)
    assert np.abs(bias).max() <= bound and bias.min() < 0 < bias.max()


# --------------------------------------------------------------------------------------------
# Query.

_LAMP1 = lamp.get_task("LaMP_1").format_input(title="Graph nets", ref1="Soup", ref2="Trees")


def _data_config(**fields):
    return ml_collections.ConfigDict({"task": "LaMP_1", "max_input_tokens": 256, **fields})


def test_lamp1_title_query():
    [example] = lamp.parse_examples([{"id": "LaMP_1-0", "input": _LAMP1, "profile": []}], None,
                                    "LaMP_1")[1]
    assert pipeline.query_text(example, None, _data_config()) == "Graph nets [1]: Soup [2]: Trees"
    assert pipeline.query_text(example, None, _data_config(lamp1_query="title")) == "Graph nets"


class _WordTokenizer:
    """One token per word: enough to see where the input is cut."""

    def encode(self, text):
        return text.split(" ")

    def decode(self, ids):
        return " ".join(ids)


def test_query_from_truncated_input_follows_the_llm_cut():
    llm = type("LLM", (), {"tokenizer": _WordTokenizer()})()
    text = lamp.get_task("LaMP_3").format_input(review="one two three four five")
    example = lamp.Example(id="x", user_id=None, input=text, query="unused", history=(),
                           target=None)
    config = _data_config(task="LaMP_3", query_from="truncated_input")
    assert pipeline.query_text(example, llm, config) == "one two three four five"
    words = len(text.split(" "))
    config.max_input_tokens = words - 2  # keeps words - 3 words: the last three are cut
    assert pipeline.query_text(example, llm, config) == "one two"
    lamp1 = dataclasses.replace(example, input=_LAMP1)
    config = _data_config(query_from="truncated_input", lamp1_query="title", max_input_tokens=14)
    assert pipeline.query_text(lamp1, llm, config) == "Graph nets"
    assert lamp.reference_query("LaMP_1", 'the title "Graph ne') == "Graph ne"


# --------------------------------------------------------------------------------------------
# Augmentation.


def _example(size):
    return lamp.Example(id="x", user_id=None, input="i", query="q",
                        history=tuple(f"h{k}" for k in range(size)), target="t",
                        history_dates=tuple(str(k) for k in range(size)))


@pytest.mark.parametrize("size", [3, 4, 7, 40])
def test_augment_from_all_drops_1_to_ceil_half_of_the_whole_history(size):
    example = _example(size)
    dropped = set()
    for copy in range(1, 400):
        augmented = grain_pipeline.augmented_copy(example, seed=0, index=5, copy=copy,
                                                  max_history=2, augment_from="all")
        assert augmented == grain_pipeline.augmented_copy(example, seed=0, index=5, copy=copy,
                                                          max_history=2, augment_from="all")
        full = grain_pipeline.augmented_copy(example, seed=0, index=5, copy=copy,
                                             max_history=None, augment_from="all")
        dropped.add(size - len(full.history))
        assert set(full.history) <= set(example.history)
        assert list(full.history) == sorted(full.history, key=example.history.index)
        assert full.history_dates == tuple(h[1:] for h in full.history)
        # the model sees at most max_history of the survivors, drawn from the whole history
        assert len(augmented.history) == min(2, len(full.history))
    assert dropped == set(range(1, math.ceil(size / 2) + 1))
    other_seed = [grain_pipeline.augmented_copy(example, seed=1, index=5, copy=c,
                                                augment_from="all").history for c in range(1, 20)]
    same_seed = [grain_pipeline.augmented_copy(example, seed=0, index=5, copy=c,
                                               augment_from="all").history for c in range(1, 20)]
    assert other_seed != same_seed


def test_augment_from_all_counts_examples_by_their_whole_history():
    source = [_example(3), _example(40)]
    assert grain_pipeline.num_train_examples(source, 10, max_history=2) == 2
    assert grain_pipeline.num_train_examples(source, 10, max_history=2, augment_from="all") == 22
    assert grain_pipeline.augmented_copy(_example(2), seed=0, index=0, copy=1,
                                         augment_from="all") is None


# --------------------------------------------------------------------------------------------
# Optimizer.


def test_reference_optimizer_decays_no_bias_or_norm_and_rounds_warmup_up():
    optim = common.lamp_config("LaMP_3", "paper").optim
    big_decay = ml_collections.ConfigDict(  # big enough to see in float32
        {**optim.to_dict(), "lr": 0.1, "encoder_lr": 0.1, "weight_decay": 0.5})
    params = {"persona_projector": {"fc1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
              "query_encoder": {"norm": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
                                "dense": {"kernel": jnp.ones((2, 2))}},
              "instruction": jnp.ones(2)}
    optimizer = train.make_optimizer(big_decay, total_steps=30)
    state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):  # ceil(0.05 * 30) = 2 warmup steps: the lr is nonzero from step 1
        updates, state = optimizer.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    assert float(params["persona_projector"]["fc1"]["kernel"][0, 0]) < 1.0
    assert float(params["instruction"][0]) < 1.0
    assert float(params["query_encoder"]["dense"]["kernel"][0, 0]) < 1.0
    for untouched in (params["persona_projector"]["fc1"]["bias"],
                      params["query_encoder"]["norm"]["scale"],
                      params["query_encoder"]["norm"]["bias"]):
        np.testing.assert_array_equal(untouched, 1.0)
    warmup = lambda rounding: train.make_optimizer(
        ml_collections.ConfigDict({**optim.to_dict(), "warmup_rounding": rounding}), 30)
    for rounding, expected_lr_at_1 in (("ceil", 0.5e-4), ("floor", 1e-4)):  # 2 or 1 steps
        opt = warmup(rounding)
        p = {"instruction": jnp.zeros(1)}
        s = opt.init(p)
        _, s = opt.update({"instruction": jnp.ones(1)}, s, p)
        u, _ = opt.update({"instruction": jnp.ones(1)}, s, p)
        assert float(-u["instruction"][0]) == pytest.approx(expected_lr_at_1, rel=1e-3)
