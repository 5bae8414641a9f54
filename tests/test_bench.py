"""plug_jax.bench: the train benchmark's timings and FLOP count, and the torch peer computing the
same loss as ours on the same batch from the same plug init."""

import jax
import numpy as np
import pytest

from configs import lamp3
from plug_jax import bench, cli, errors, experiment, train
from plug_jax.data import pipeline


def test_train_benchmark_times_steps_and_counts_flops(tmp_path):
    config = lamp3.get_config("tiny")
    result = bench.train(config, tmp_path, steps=2, warmup=0, history=(16, 2),
                         variants=("llm.attention_impl=einsum",))
    ours, shapes = result["ours"], result["shapes"]
    assert len(ours["step_times_s"]) == 2 and min(ours["step_times_s"]) > 0
    # The first history size is the config's row; each size and variant has its own.
    assert shapes["history"] == 16 and 1 <= shapes["history_items"] <= 16
    assert result["by_history"]["16"]["ours"] == ours
    # Ratios are medians of the rounds' ratios (each round times every update once).
    smallest = result["by_history"]["2"]["ours"]["step_times_s"]
    assert result["largest_over_smallest_history"]["ours"] == pytest.approx(
        np.median(np.divide(ours["step_times_s"], smallest)))
    einsum = result["variants"]["llm.attention_impl=einsum"]
    # Llama's attention through jax.nn.dot_product_attention or our einsums: the same loss.
    assert einsum["ours"]["first_loss"] == pytest.approx(ours["first_loss"], rel=1e-5)
    assert einsum["over_ours"] == pytest.approx(
        np.median(np.divide(einsum["ours"]["step_times_s"], ours["step_times_s"])))
    assert ours["xla_temp_mb"] > 0 and einsum["ours"]["xla_temp_mb"] > 0
    assert ours["first_call_s"] > 0 and ours["step_s"] > 0 and ours["peak_rss_mb"] > 0
    assert np.isfinite(ours["first_loss"])

    # By hand: the tiny Llama and the plug's parameter counts, the batch's padded token counts.
    exp = experiment.build(config, tmp_path, splits=(config.data.train_split,), progress=False)
    llm_params = sum(x.size for x in jax.tree.leaves(exp.llm_params))
    plug_params = sum(x.size for x in jax.tree.leaves(exp.init_plug_params(jax.random.key(0))))
    examples = exp.splits[config.data.train_split]
    length = pipeline.longest_llm_length(exp.llm, examples, config.data, with_targets=True)
    batch = config.optim.batch_size
    soft_tokens = 1 + config.plug.persona_tokens + config.plug.input_tokens
    assert shapes["soft_tokens"] == soft_tokens == 3  # LaMP-3: instruction, persona, input
    expected = (4 * llm_params * batch * (length + soft_tokens)
                + 6 * plug_params * batch * config.data.max_query_tokens)
    assert (shapes["llm_params"], shapes["plug_params"]) == (llm_params, plug_params)
    assert result["flops_per_step"] == expected
    assert ours["flops_per_s"] == pytest.approx(expected / ours["step_s"])
    assert "peer" not in result and result["machine"]["cpu_count"] >= 1
    table = bench.format_train(result)
    assert "ours (JAX)" in table and "largest / smallest history" in table
    assert "llm.attention_impl=einsum" in table


def test_history_items_fill_every_slot_from_the_example_s_own_items():
    vectors = np.arange(1, 7, dtype=np.float32).reshape(1, 6, 1).repeat(3, 0)
    mask = np.array([[True, True, True, False, False, False],
                     [False] * 6, [True] * 6])
    filled = bench.with_history_items({"history": vectors, "history_mask": mask, "tokens": 1}, 4)
    assert filled["tokens"] == 1
    np.testing.assert_array_equal(filled["history"][..., 0],
                                  [[1, 2, 3, 1], [0, 0, 0, 0], [3, 4, 5, 6]])
    np.testing.assert_array_equal(filled["history_mask"], [[True] * 4, [False] * 4, [True] * 4])


def test_variant_config_changes_the_named_fields():
    config = lamp3.get_config("tiny")
    changed = cli.variant_config(config, "llm.remat=True,llm.remat_policy=dots_saveable,"
                                           "optim.lr=0.5")
    assert (changed.llm.remat, changed.llm.remat_policy, changed.optim.lr) == (
        True, "dots_saveable", 0.5)
    assert not config.llm.remat  # the config itself is left as it was
    with pytest.raises(errors.UserError, match="'llm.remats' is not a config field"):
        cli.variant_config(config, "llm.remats=True")


@pytest.mark.parametrize("llm_path, dtype", [("tiny-llama", "float32"), ("smollm2", "float32"),
                                             ("smollm2", "bfloat16")])
def test_torch_peer_loss_equals_ours(llm_path, dtype, tmp_path):
    """The same function on the same weights: equal to float32 rounding; in bf16 (as the
    reference trains) each side rounds differently, both near the float32 loss."""
    torch = pytest.importorskip("torch")
    from plug_jax import torch_peer

    config = lamp3.get_config("tiny")
    config.llm.path = llm_path
    config.optim.batch_size = 2
    if llm_path == "tiny-llama":  # the peer's learned attention scale and input token too
        config.plug.update(attention_scale=20.0, learn_attention_scale=True, input_tokens=1)
    losses = {}
    for llm_dtype in sorted({"float32", dtype}):
        config.llm.dtype = llm_dtype
        exp = experiment.build(config, tmp_path, splits=(config.data.train_split,),
                               progress=False)
        examples = exp.splits[config.data.train_split][:2]
        length = pipeline.longest_llm_length(exp.llm, examples, config.data, with_targets=True)
        features = pipeline.make_featurize(exp, length)(examples)
        params = exp.init_plug_params(jax.random.key(0))

        loss_sum, count = jax.jit(lambda p, llm_params, b: train.loss_fn(
            p, llm_params, b, embedder=exp.embedder, llm=exp.llm))(params, exp.llm_params,
                                                                  features)
        torch.manual_seed(0)
        peer = torch_peer.TorchPeer(exp, jax.device_get(params), total_steps=4)
        assert not any(p.requires_grad for p in peer.llm.parameters())
        assert {p.dtype for p in peer.llm.parameters()} == {getattr(torch, llm_dtype)}
        batch = torch_peer.to_torch(features)
        losses[llm_dtype] = float(loss_sum / count), peer.loss(batch)
        # a step reports the loss before it
        assert peer.step(batch) == pytest.approx(losses[llm_dtype][1], abs=1e-6)
    print(f"{llm_path}: loss (ours, torch) {losses}")
    ours, theirs = losses["float32"]
    assert abs(ours - theirs) <= 1e-4
    if dtype == "bfloat16":
        ours16, theirs16 = losses["bfloat16"]
        assert ours16 != ours and abs(ours16 - ours) <= 0.02 * ours
        assert theirs16 != theirs and abs(theirs16 - ours) <= 0.02 * ours


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decode_benchmark_answers_as_transformers_generate(method, tmp_path):
    pytest.importorskip("torch")
    config = lamp3.get_config("tiny")
    config.decode.update(method=method, eval_batch_size=4, max_new_tokens=4)
    result = bench.decode(config, tmp_path, steps=1, warmup=0, peer="torch")
    ours, peer, shapes = result["ours"], result["peer"], result["shapes"]
    assert shapes["num_beams"] == (4 if method == "beam" else 1) and shapes["batch_size"] == 4
    # The same weights, soft tokens, search and lengths give the same answers.
    assert result["same_answers"] == 1.0
    for side in (ours, peer):
        assert side["step_s"] > 0 and side["first_call_s"] > 0 and side["peak_rss_mb"] > 0
        assert side["examples_per_s"] == pytest.approx(4 / side["step_s"])
        assert 4 <= side["tokens_per_s"] * side["step_s"] <= 4 * 4
    assert result["peer_over_ours"] == pytest.approx(peer["step_s"] / ours["step_s"])
    table = bench.format_decode(result)
    assert "answer tokens / s" in table and "same answers as ours: 100%" in table


def test_answer_tokens_count_up_to_the_first_eos():
    tokens = np.array([[5, 6, 2, 2], [2, 2, 2, 2], [7, 8, 9, 10]])
    assert bench.answer_tokens(tokens, eos_id=2) == 3 + 1 + 4


def test_embed_benchmark_embeds_the_history_texts_as_bert_model(tmp_path):
    pytest.importorskip("torch")
    config = lamp3.get_config("tiny")
    texts = bench.history_texts(config, tmp_path)
    assert len(texts) == len(set(texts)) > 20
    result = bench.embed(config, tmp_path, steps=1, peer="torch", texts=20)
    ours, peer, shapes = result["ours"], result["peer"], result["shapes"]
    assert shapes["texts"] == 20 and shapes["pooling"] == "mean"
    assert result["max_cosine_distance"] < 1e-5
    for side in (ours, peer):
        assert side["examples_per_s"] == pytest.approx(20 / side["step_s"])
        assert side["tokens_per_s"] == pytest.approx(shapes["tokens"] / side["step_s"])
    assert "texts / s" in bench.format_embed(result)
