"""A trained plug used on its own: one input, a questions file, unseen and empty-history users,
the per-text history cache, refusal of another LLM, and input embeddings that transformers'
Llama decodes as plug_jax does."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from safetensors.numpy import load_file

from configs import lamp3
from plug_jax import experiment as experiment_lib, export, metrics, personalize
from plug_jax.data import lamp

REPO = Path(__file__).resolve().parents[1]
PROFILE = [{"text": "Cold food and a rude waiter.", "score": "1", "date": "2020-01-02"},
           {"text": "Slow, but the soup was fine.", "score": "3", "date": "2021-03-04"},
           {"text": "Best pizza in town!", "score": "5", "date": "2022-05-06"}]
REVIEW = "The pasta was good, the service slow."


@pytest.fixture(scope="module")
def plug_path(tiny_trained_run):
    return tiny_trained_run[0] / "plug"


@pytest.fixture(scope="module")
def personalizer(plug_path, tmp_path_factory):
    return personalize.Personalizer.load(plug_path,
                                         cache_dir=tmp_path_factory.mktemp("history_cache"))


def _command(*args: str) -> None:
    """Runs the command in this process, its flags parsed from `args`."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["personalize", *args])
    try:
        personalize.personalize()
    finally:
        flags.FLAGS.unparse_flags()


def test_one_input_prints_a_label(plug_path, tmp_path, capsys):
    profile = tmp_path / "user.json"
    profile.write_text(json.dumps({"profile": PROFILE}))
    _command("--plug", str(plug_path), "--profile", str(profile), "--input", REVIEW,
             "--cache_dir", str(tmp_path / "cache"))
    assert capsys.readouterr().out.strip() in lamp.get_task("LaMP_3").labels


def test_questions_file_gives_a_lamp_outputs_file_and_embeddings(tiny_trained_run, tmp_path):
    workdir, result = tiny_trained_run
    questions = next((workdir / "data").glob("*/dev_questions.json"))
    out, embeds = tmp_path / "outputs.json", tmp_path / "embeds.safetensors"
    _command("--plug", str(workdir / "plug"), "--questions", str(questions), "--out", str(out),
             "--emit_embeds", str(embeds), "--cache_dir", str(tmp_path / "cache"))
    task, predictions = lamp.read_outputs(out)
    examples = lamp.load_split(questions.parent, "dev")
    assert task == "LaMP_3" and list(predictions) == [e.id for e in examples]
    scores = metrics.evaluate(task, list(predictions.values()), [e.target for e in examples])
    assert set(scores) == {"mae", "rmse"}

    tensors = load_file(str(embeds))
    exp = result.experiment
    count, length, width = tensors["inputs_embeds"].shape
    assert (count, width) == (len(examples), exp.llm.width)
    assert tensors["attention_mask"].shape == (count, length)
    prompt_lengths = exp.llm.prompt_lengths([e.input for e in examples],
                                            exp.config.data.max_input_tokens)
    np.testing.assert_array_equal(tensors["attention_mask"].sum(axis=1),
                                  np.array(prompt_lengths) + exp.embedder.num_soft_tokens)
    assert np.all(tensors["attention_mask"][:, -1] == 1)  # left-padded
    with open(embeds, "rb") as f:  # the metadata names the rows
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert json.loads(header["__metadata__"]["question_ids"]) == [e.id for e in examples]


def test_unseen_and_empty_history_users(personalizer, tiny_trained_run):
    exp = tiny_trained_run[1].experiment
    seen = {text for e in exp.splits["train"] for text in e.history}
    unseen = personalizer.example(REVIEW, PROFILE, question_id="new-user")
    assert unseen.history[0].startswith("score 1: ") and not seen & set(unseen.history)
    empty = personalizer.example(REVIEW, [], question_id="no-history")
    answers = personalizer.answer([unseen, empty])
    assert all(a in lamp.get_task("LaMP_3").labels for a in answers)
    embeds, mask = personalizer.input_embeddings([unseen, empty])
    assert np.isfinite(embeds).all() and mask.shape == embeds.shape[:2]


def test_history_embeddings_are_cached_per_text(personalizer, tmp_path):
    encoded = []
    encode = personalizer.texts.encode

    def counting(texts):
        encoded.extend(texts)
        return encode(texts)

    def request(profile):
        personalizer.answer([personalizer.example(REVIEW, profile)])
        new = len(encoded)
        encoded.clear()
        return new

    personalizer.texts.encode = counting
    try:
        profile = [dict(item, text=f"{item['text']} ({tmp_path.name})") for item in PROFILE]
        assert request(profile[:2]) == 2
        assert request(profile[:2]) == 0  # the same user again
        assert request(profile) == 1      # one new history item
    finally:
        personalizer.texts.encode = encode
    # A new process reads the texts back from disk.
    again = personalizer.experiment.text_cache(personalizer.texts.directory.parent)
    assert len(again) >= 3
    again.encode = lambda texts: pytest.fail(f"re-encoded {texts}")
    again.table(personalizer.example(REVIEW, profile).history)


def test_another_llm_is_refused_with_one_line(plug_path, tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "plug_jax.personalize", "--plug", str(plug_path), "--input", REVIEW,
         "--config", "configs/lamp3.py:tiny", "--config.llm.path=smollm2",
         "--cache_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert process.returncode == 2, process.stderr[-2000:]
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "width" in lines[0], lines


def test_another_encoder_is_refused(plug_path, tmp_path):
    runtime = lamp3.get_config("tiny")
    runtime.encoder.path = "minilm"
    with pytest.raises(personalize.MismatchError, match="encoder"):
        personalize.Personalizer.load(plug_path, runtime, tmp_path)


# ----------------------------------------------------------------------- any runtime: transformers

def test_emitted_embeddings_decode_alike_in_transformers(tmp_path):
    import torch

    from plug_jax import torch_peer

    # The real SmolLM2 with a random plug: interop needs no training.
    config = lamp3.get_config("tiny")
    config.llm.path = "smollm2"
    exp = experiment_lib.build(config, splits=(), progress=False)
    export.export_plug(tmp_path / "plug", exp.init_plug_params(jax.random.key(3)),
                       export.plug_config_for(exp))
    del exp
    personalizer = personalize.Personalizer.load(tmp_path / "plug", cache_dir=tmp_path / "cache")
    examples = [personalizer.example("Loved it, will come back.", PROFILE, "a"),
                personalizer.example(REVIEW, PROFILE[:1], "b"),
                personalizer.example("Meh.", [], "c")]
    new_tokens = 4
    ours = personalizer.greedy_tokens(examples, new_tokens)
    embeds, mask = personalizer.input_embeddings(examples)

    # SmolLM2's weights as transformers reads them from the GGUF file equal ours
    # (tests/test_llama.py): the same weights in a transformers Llama, without reading it again.
    exp = personalizer.experiment
    model = torch_peer.hf_llama(exp.llm.module.config, exp.llm_params)
    with torch.no_grad():
        generated = model.generate(inputs_embeds=torch.from_numpy(embeds),
                                   attention_mask=torch.from_numpy(mask), do_sample=False,
                                   max_new_tokens=new_tokens, pad_token_id=0).numpy()
    eos = personalizer.experiment.llm.eos_id
    theirs = [[int(t) for t in (row[:list(row).index(eos)] if eos in row else row)]
              for row in generated]
    print(f"greedy tokens: plug_jax {ours}, transformers {theirs}")
    assert theirs == ours
