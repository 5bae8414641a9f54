"""Bad input never crashes and never writes: each command stops with one line on stderr naming
the file, record and field (or the flag), exit status 2, and its workdir as it was.

The commands run in-process through `run_command` (JAX imports once); two cases run the real
command as a subprocess, end to end."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from plug_jax import cli, compare, embed, evaluate, export, personalize, plan, train
from plug_jax.data import lamp, synthetic
from plug_jax.models import assets

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/lamp3.py:tiny"]


def run_command(module, args, required=("config", "workdir")) -> tuple[int, str]:
    """(exit status, stderr) of `python -m plug_jax.<module> ARGS`, run in this process."""
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)  # --config's override flags, registered by the last parse
    flags.FLAGS.unparse_flags()
    # cli.run marks `required` flags with validators, which would outlive this command.
    validators = {name: list(flags.FLAGS[name].validators) for name in flags.FLAGS}
    argv, sys.argv = sys.argv, [module.__name__, *map(str, args)]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as stop:
            cli.run(module.main, *required)
    finally:
        sys.argv = argv
        for name, kept in validators.items():
            flags.FLAGS[name].validators[:] = kept
    return stop.value.code, stderr.getvalue()


def snapshot(directory: Path) -> dict | None:
    """Every file under `directory` with its size and mtime; None when it does not exist."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*")}


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    """A small valid LaMP-3 directory (train, dev, dev_new) that each case breaks a copy of."""
    return synthetic.write_lamp_dir(tmp_path_factory.mktemp("lamp") / "good", "LaMP_3",
                                    num_users=4, examples_per_user=2, profile_size=3)


def _edit_json(name, edit):
    def apply(directory: Path):
        path = directory / name
        value = json.loads(path.read_text())
        edit(value)  # in place
        path.write_text(json.dumps(value))
    return apply


def _write(name, data: bytes):
    return lambda directory: (directory / name).write_bytes(data)


def _remove(name):
    return lambda directory: (directory / name).unlink()


# case -> (how to break the LaMP directory, what the one line must hold)
BAD_DATA = {
    "missing questions file": (_remove("train_questions.json"), "no train_questions.json"),
    "invalid JSON": (_write("train_questions.json", b'[{"id": "x",]'),
                     "train_questions.json: invalid JSON at line 1"),
    "truncated JSON": (lambda d: (d / "train_outputs.json").write_bytes(
        (d / "train_outputs.json").read_bytes()[:50]), "train_outputs.json: invalid JSON"),
    "ids differ": (_edit_json("dev_outputs.json",
                              lambda o: o["golds"][0].update(id="LaMP_3-nobody-0")),
                   "dev_questions.json: record 0 (id "),
    "duplicate id": (_edit_json("train_questions.json",
                                lambda q: q[1].update(id=q[0]["id"])),
                     "record 1 (id '"),
    "record without input": (_edit_json("train_questions.json", lambda q: q[2].pop("input")),
                             "record 2 (id '"),
    "record without profile": (_edit_json("dev_questions.json", lambda q: q[0].pop("profile")),
                               "field 'profile' is missing"),
    "profile item without text": (
        _edit_json("train_questions.json", lambda q: q[0]["profile"][1].pop("text")),
        "field 'profile[1].text' is missing"),
    "wrong type": (_edit_json("train_questions.json", lambda q: q[3].update(input=42)),
                   "record 3 (id '"),
    "not UTF-8": (lambda d: (d / "dev_questions.json").write_bytes(
        (d / "dev_questions.json").read_bytes().replace(b"review", b"r\xe9view", 1)),
        "dev_questions.json: not UTF-8"),
    "empty split": (lambda d: (_write("dev_questions.json", b"[]")(d), _write(
        "dev_outputs.json", b'{"task": "LaMP_3", "golds": []}')(d)),
        "dev_questions.json: no questions"),
    "training split without outputs": (_remove("train_outputs.json"),
                                       "no train_outputs.json: the training split needs"),
    "LaMP-3 gold that is no number": (
        _edit_json("dev_outputs.json", lambda o: o["golds"][1].update(output="nan")),
        "dev_outputs.json: gold 1 (id '"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_lamp_directory_stops_train_with_one_line(case, good_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(good_data, data)
    break_it, expected = BAD_DATA[case]
    break_it(data)
    before = snapshot(data)
    workdir = tmp_path / "run"
    code, stderr = run_command(train, [*TINY, f"--config.data.dir={data}", f"--workdir={workdir}"])
    assert code == 2, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and expected in line, stderr
    assert "Traceback" not in stderr
    if case not in ("missing questions file", "empty split", "training split without outputs"):
        assert str(data) in line  # the file is named
    assert not workdir.exists()
    assert snapshot(data) == before


def test_wrong_type_names_record_and_field(good_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(good_data, data)
    BAD_DATA["wrong type"][0](data)
    code, stderr = run_command(train, [*TINY, f"--config.data.dir={data}",
                                       f"--workdir={tmp_path / 'run'}"])
    assert code == 2
    assert stderr.strip().endswith("field 'input' must be a string, got int"), stderr


def _llama_dir(directory: Path, vocab_size: int, model_type: str = "llama") -> Path:
    """A Hugging Face directory of a tiny Llama (config and tokenizer; weights never reached)."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(dict(
        model_type=model_type, vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, rms_norm_eps=1e-6)))
    shutil.copy(assets.t5_tokenizer_json(), directory / "tokenizer.json")  # 32100 tokens
    return directory


def _encoder_dir(directory: Path, safetensors: bytes) -> Path:
    """MiniLM's directory with another model.safetensors."""
    directory.mkdir()
    for item in assets.minilm_dir().iterdir():
        if item.name != "model.safetensors":
            (directory / item.name).symlink_to(item)
    (directory / "model.safetensors").write_bytes(safetensors)
    return directory


def _minilm_bytes() -> bytes:
    return (assets.minilm_dir() / "model.safetensors").read_bytes()


def _reshaped_minilm(directory: Path) -> bytes:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(assets.minilm_dir() / "model.safetensors")
    name = next(n for n in tensors if n.endswith("word_embeddings.weight"))
    tensors[name] = np.ascontiguousarray(tensors[name][:, :100])
    save_file(tensors, directory / "reshaped.safetensors")
    return (directory / "reshaped.safetensors").read_bytes()


def _gguf(directory: Path, data: bytes) -> str:
    path = directory / "model.gguf"
    path.write_bytes(data)
    return f"--config.llm.path={path}"


# case -> (tmp_path -> extra flags, what the one line must hold)
BAD_SETUP = {
    "unknown config field": (lambda d: ["--config.optim.lrr=1"],
                             "--config.optim.lrr: config.optim has no field 'lrr' (did you mean"),
    "config value of a wrong type": (lambda d: ["--config.optim.lr=fast"], "--config.optim.lr"),
    "unknown task": (lambda d: ["--config.data.task=LaMP_9"], "unknown LaMP task 'LaMP_9'"),
    "unknown method": (lambda d: ["--config.method=magic"], "unknown method 'magic'"),
    "plug option out of range": (lambda d: ["--config.plug.attention_scale=0"],
                                 "config.plug.attention_scale 0.0: expected > 0"),
    "unknown soft-token scale": (lambda d: ["--config.plug.soft_token_scale=foo"],
                                 "config.plug.soft_token_scale 'foo': expected one of rms, reference"),
    "missing data directory": (lambda d: [f"--config.data.dir={d / 'nowhere'}"],
                               "is not a directory"),
    "missing LLM": (lambda d: [f"--config.llm.path={d / 'nowhere'}"], "does not exist"),
    "unknown architecture": (
        lambda d: [f"--config.llm.path={_llama_dir(d / 'gpt2', 100, 'gpt2')}"],
        "config.json: unsupported architecture model_type='gpt2'"),
    "tokenizer larger than the embedding table": (
        lambda d: [f"--config.llm.path={_llama_dir(d / 'llama', 100)}"],
        "the tokenizer has 32100 tokens but the model's embedding table only 100 rows"),
    "truncated GGUF": (lambda d: [_gguf(d, assets.smollm2_gguf().read_bytes()[:3_000_000])],
                       "model.gguf: unreadable GGUF file"),
    "corrupt GGUF": (lambda d: [_gguf(d, b"GGUF" + bytes(range(256)) * 8)],
                     "model.gguf: unreadable GGUF file"),
    "empty GGUF": (lambda d: [_gguf(d, b"")], "model.gguf: unreadable GGUF file"),
    "truncated safetensors": (
        lambda d: [f"--config.encoder.path={_encoder_dir(d / 'enc', _minilm_bytes()[:100_000])}"],
        "past the end of the file"),
    "corrupt safetensors": (
        lambda d: [f"--config.encoder.path={_encoder_dir(d / 'enc', b'not a safetensors file')}"],
        "model.safetensors: truncated or not safetensors"),
    "tensor of the wrong shape": (
        lambda d: [f"--config.encoder.path={_encoder_dir(d / 'enc', _reshaped_minilm(d))}"],
        "word_embeddings.weight' has shape (30522, 100)"),
}


@pytest.mark.parametrize("case", BAD_SETUP)
def test_bad_config_or_model_stops_train_with_one_line(case, tmp_path):
    extra, expected = BAD_SETUP[case]
    workdir = tmp_path / "run"
    code, stderr = run_command(train, [*TINY, f"--workdir={workdir}", *extra(tmp_path)])
    assert code == 2, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and expected in line, stderr
    assert "Traceback" not in stderr
    assert not workdir.exists()


def test_unwritable_workdir(tmp_path):
    (tmp_path / "a_file").write_text("")
    code, stderr = run_command(train, [*TINY, f"--workdir={tmp_path / 'a_file' / 'run'}"])
    assert code == 2
    assert stderr.strip().splitlines()[-1].endswith(f"{tmp_path / 'a_file'} is not a directory")
    assert (tmp_path / "a_file").read_text() == ""


def test_other_commands_stop_with_one_line(good_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(good_data, data)
    _edit_json("dev_questions.json", lambda q: q[1].pop("profile"))(data)
    for module in (compare, embed):
        code, stderr = run_command(module, [*TINY, f"--config.data.dir={data}",
                                            f"--workdir={tmp_path / module.__name__}"])
        assert (code, "Traceback" in stderr) == (2, False), stderr
        assert "dev_questions.json: record 1 (id '" in stderr and "'profile' is missing" in stderr
        assert not (tmp_path / module.__name__).exists()
    code, stderr = run_command(export, [f"--workdir={tmp_path / 'no_run'}",
                                        f"--out={tmp_path / 'plug'}"], ("workdir", "out"))
    assert code == 2 and stderr.startswith("error: ") and "no training checkpoint" in stderr
    assert not (tmp_path / "plug").exists()
    code, stderr = run_command(plan, [*TINY, "--target=tpu-v99"], ("config",))
    assert code == 2 and "unknown target 'tpu-v99'" in stderr
    code, stderr = run_command(personalize, [f"--plug={tmp_path / 'no_plug'}", "--input=x"],
                               ("plug",))
    assert code == 2 and "not an exported plug" in stderr


# A plug evaluated under another configuration than its training run's reports wrong numbers.
PLUG_MISMATCHES = {
    "soft-token position": ("--config.llm.soft_token_position=start", "llm.soft_token_position"),
    "query instruction": ("--config.encoder.query_instruction=query: ",
                          "encoder.query_instruction"),
    "encoder": ("--config.encoder.path=minilm", "encoder.path 'tiny-bert' vs 'minilm'"),
    "LLM": ("--config.llm.path=tiny-t5", "llm.path 'tiny-llama' vs 'tiny-t5'"),
    "persona tokens": ("--config.plug.persona_tokens=2", "plug.persona_tokens"),
}


@pytest.mark.parametrize("case", PLUG_MISMATCHES)
def test_evaluate_refuses_a_plug_of_another_configuration(case, tiny_trained_run):
    workdir, _ = tiny_trained_run
    flag, expected = PLUG_MISMATCHES[case]
    before = snapshot(workdir)
    code, stderr = run_command(evaluate, [*TINY, f"--workdir={workdir}", "--split=dev", flag])
    assert code == 2, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {workdir / 'plug'}: the plug was trained under another")
    assert expected in line
    assert snapshot(workdir) == before


def test_evaluate_refuses_a_plug_of_another_llm_width(tiny_trained_run, tmp_path, monkeypatch):
    """Same config, but the LLM at its path has changed: caught by the loaded LLM's width,
    before anything is written."""
    from plug_jax import llm

    workdir, _ = tiny_trained_run
    plug_config = json.loads((workdir / "plug" / export.PLUG_CONFIG_FILE).read_text())
    plug_config["embedder"]["llm_width"] += 1
    moved = tmp_path / "run"
    shutil.copytree(workdir, moved, symlinks=True)
    (moved / "plug" / export.PLUG_CONFIG_FILE).write_text(json.dumps(plug_config))
    before = snapshot(moved)
    code, stderr = run_command(evaluate, [*TINY, f"--workdir={moved}", "--split=dev"])
    assert code == 2, stderr
    assert "the plug was trained for the llama LLM tiny-llama (width" in stderr
    assert snapshot(moved) == before
    del llm


def test_a_real_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(config, workdir, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train.experiment_lib, "build", broken)
    with pytest.raises(ZeroDivisionError):
        run_command(train, [*TINY, f"--workdir={tmp_path / 'run'}"])


@pytest.mark.parametrize("args, expected", [
    (["--config.data.dir={data}"], "train_questions.json: record 0 (id '"),
    (["--config.optim.lrr=1"], "--config.optim.lrr: config.optim has no field 'lrr'"),
])
def test_real_command_exits_2_with_one_line(args, expected, good_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(good_data, data)
    _edit_json("train_questions.json", lambda q: q[0].pop("input"))(data)
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "plug_jax.train", *TINY, f"--workdir={workdir}",
         *(a.format(data=data) for a in args)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert expected in result.stderr
    assert not workdir.exists()


def test_unusual_input_works(tmp_path, capsys):
    """An empty history, one longer than max_history (the most recent kept), an input longer than
    the LLM's limit (truncated, said once) and unusual Unicode (emoji, right-to-left, combining
    marks, NUL) all featurize."""
    from configs import lamp3
    from plug_jax import experiment
    from plug_jax.data import pipeline

    task = lamp.TASKS["LaMP_3"]
    unusual = "😀 مرحبا שלום e\u0301\u0301 nul\u0000 \u202eevil\u202c \U0010ffff"
    history = [{"text": f"{unusual} item {i}", "score": str(1 + i % 5), "date": str(1000 + i)}
               for i in range(20)]
    questions = [
        {"id": "LaMP_3-a-0", "input": task.format_input(review=unusual), "profile": history},
        {"id": "LaMP_3-b-0", "input": task.format_input(review="long " * 500), "profile": []},
        {"id": "LaMP_3-c-0", "input": task.format_input(review="long " * 400), "profile": []},
    ]
    golds = {"task": "LaMP_3", "golds": [{"id": q["id"], "output": "4"} for q in questions]}
    for split in ("train", "dev"):
        (tmp_path / f"{split}_questions.json").write_text(json.dumps(questions))
        (tmp_path / f"{split}_outputs.json").write_text(json.dumps(golds))
    config = lamp3.get_config("tiny")
    config.data.dir, config.data.eval_splits = str(tmp_path), ("dev",)
    exp = experiment.build(config, tmp_path / "run", progress=False)
    examples = exp.splits["train"]
    assert examples[0].history[-1].endswith(f"{unusual} item 19")
    capsys.readouterr()
    features = pipeline.featurize(examples, exp.llm, exp.query_tokenizer, exp.table,
                                  data_config=config.data, query_instruction="",
                                  with_targets=True)
    notes = [line for line in capsys.readouterr().out.splitlines() if "truncated" in line]
    assert notes == [f"note: 2 of 3 inputs are longer than data.max_input_tokens="
                     f"{config.data.max_input_tokens} tokens and are truncated"]
    rows = features["history_rows"]
    assert rows.shape == (3, config.data.max_history)
    assert (rows[0] >= 0).all() and (rows[1:] == -1).all()  # full, empty, empty
    recent = exp.table.rows(examples[0].history, config.data.max_history)
    assert (rows[0] == recent).all()  # the most recent max_history items
    assert features["mask"].sum(axis=1).max() <= config.data.max_input_tokens + 64
