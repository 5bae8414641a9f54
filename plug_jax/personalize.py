"""Personalized answers from an exported plug, for any user: seen in training or not, with any
history, an empty one included.

  python -m plug_jax.personalize --plug RUN/plug --profile user.json --input "Great food."
  python -m plug_jax.personalize --plug RUN/plug --questions test_questions.json --out outputs.json
  python -m plug_jax.personalize --plug RUN/plug --questions q.json --emit_embeds q.safetensors

The export carries the training run's config: the LLM, the encoder and the recipe (history
labels, lengths, decoding) are rebuilt from it. `--config FILE --config.llm.path=...` says where
the LLM and the encoder live on this machine and how to decode (RUNTIME_FIELDS); the recipe stays
the export's. An LLM or encoder other than the plug's (another family or width, other token
embeddings) is refused with one line and exit status 2.

A profile file holds a LaMP profile: a list of items (LaMP-3: {"text", "score"}), or
{"profile": [...]}; without --profile the user has no history. An --input outside the task's
template fills it (the tasks whose template has one field: LaMP-2 to LaMP-7).

History embeddings are cached per text under --cache_dir (default ~/.cache/plug_jax/history):
a user's next request encodes nothing, a new history item encodes only itself.

--emit_embeds writes, per question, the LLM's input embeddings with the soft tokens spliced in
where the plug puts them ("inputs_embeds" [N, L, D] float32, left-padded) and "attention_mask"
[N, L] (int64); the metadata's "question_ids" (a JSON list) names the rows. Any runtime that
takes input embeddings then serves the personalized LLM without plug_jax (README.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import string
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from plug_jax import cli, decode, errors, evaluate, export, plug
from plug_jax import experiment as experiment_lib
from plug_jax import llm as llm_lib
from plug_jax.data import history as history_lib, lamp
from plug_jax.models import assets, llama

# What --config may change: where the models live here, and how to decode. The rest is the recipe
# the plug was trained with.
RUNTIME_FIELDS = ("llm.path", "llm.dtype", "llm.remat", "encoder.path", "decode", "mesh")
# Token-embedding RMS of the LLM the plug was trained for, against this one's: a bfloat16 copy of
# the same LLM is within 1e-3.
FINGERPRINT_RTOL = 1e-2


class MismatchError(errors.UserError):
    """The LLM or encoder at hand is not the one the plug was trained for."""


class UsageError(errors.UserError):
    """Flags that do not make a request."""


def run_config(plug_config: Mapping[str, Any],
               runtime: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The export's run config, with `runtime`'s RUNTIME_FIELDS when given."""
    config = export.run_config_of(plug_config)
    for field in RUNTIME_FIELDS if runtime is not None else ():
        section, _, name = field.partition(".")
        if name:
            config[section][name] = runtime[section][name]
        else:
            config[section] = runtime[section]
    return config


def compatibility_problem(plug_config: Mapping[str, Any], exp) -> str | None:
    """Why the experiment's LLM or encoder cannot feed the plug, in one line; None if they can.
    Abstract experiments are checked by shape alone."""
    embedder, trained = plug_config["embedder"], plug_config["llm"]
    here = exp.config.llm.path
    family = export.llm_family(exp.llm)
    if family != trained["family"] or exp.llm.width != embedder["llm_width"]:
        return (f"the plug was trained for the {trained['family']} LLM {trained['path']} (width "
                f"{embedder['llm_width']}), not {here} ({family}, width {exp.llm.width})")
    table = exp.llm.embedding_table(exp.llm_params)
    if not isinstance(table, jax.ShapeDtypeStruct):
        rms = plug.embedding_rms(table)
        if not math.isclose(rms, embedder["soft_token_rms"], rel_tol=FINGERPRINT_RTOL):
            return (f"the plug was trained for the LLM {trained['path']}, whose token embeddings "
                    f"differ from {here}'s (RMS {embedder['soft_token_rms']:.5g} vs {rms:.5g})")
    trained_encoder = embedder["encoder_config"]
    differing = [f"{name} {trained_encoder.get(name)} vs {value}"
                 for name, value in dataclasses.asdict(exp.encoder_config).items()
                 if trained_encoder.get(name) != value]
    if differing:
        return (f"the plug was trained with the encoder {plug_config['encoder']['path']}, not "
                f"{exp.config.encoder.path} ({', '.join(differing)})")
    expected = plug_config["encoder"].get("embedding_rms")
    found = plug.encoder_embedding_rms(exp.encoder_params)
    if expected and found and not math.isclose(found, expected, rel_tol=FINGERPRINT_RTOL):
        return (f"the plug was trained with the encoder {plug_config['encoder']['path']}, whose "
                f"weights differ from {exp.config.encoder.path}'s (word-embedding RMS "
                f"{expected:.5g} vs {found:.5g})")
    return None


def task_input(task: lamp.Task, text: str) -> str:
    """`text` as the task's prompt: as is when it follows the template, else filling a
    one-field template."""
    try:
        task.query_from_input(text)
        return text
    except ValueError:
        fields = [name for _, name, _, _ in string.Formatter().parse(task.input_template) if name]
        if len(fields) != 1:
            raise lamp.LampFormatError(f"--input does not follow the {task.name} template: "
                                       f"{task.input_template!r}") from None
        return task.format_input(**{fields[0]: text})


def read_profile(path: str | Path | None) -> list:
    """A profile file's items: a JSON list, or an object with a "profile" list; None: []."""
    if path is None:
        return []
    profile = lamp._read_json(Path(path))
    if isinstance(profile, dict):
        profile = profile.get("profile")
    if not isinstance(profile, list):
        raise lamp.LampFormatError(f"{path}: expected a list of profile items or "
                                   '{"profile": [...]}')
    return profile


@dataclasses.dataclass
class Personalizer:
    """An exported plug with its LLM and encoder, answering for any user."""

    experiment: Any            # plug_jax.experiment.Experiment, built without data
    plug_params: Any
    plug_config: dict
    texts: history_lib.TextEmbeddingCache

    @classmethod
    def load(cls, plug_path: str | Path, runtime: ml_collections.ConfigDict | None = None,
             cache_dir: str | Path | None = None) -> "Personalizer":
        """Rebuilds the plug's run from the export (runtime: see RUNTIME_FIELDS); MismatchError
        when the LLM or encoder is not the plug's (checked by shape before any weight loads)."""
        plug_config, params = export.load_plug(plug_path)
        config = run_config(plug_config, runtime)
        for abstract in (True, False):
            exp = experiment_lib.build(config, splits=(), abstract=abstract, progress=False)
            problem = compatibility_problem(plug_config, exp)
            if problem:
                raise MismatchError(problem)
        # The export's own module: its soft-token scale is the one the plug was trained at.
        exp = dataclasses.replace(exp, embedder=export.user_embedder_from_config(plug_config))
        return cls(exp, params, plug_config, exp.text_cache(cache_dir))

    @property
    def task(self) -> lamp.Task:
        return self.experiment.task

    # ---------------------------------------------------------------------------- questions

    def examples(self, questions: Any, source: str = "questions") -> list[lamp.Example]:
        """Decoded LaMP questions -> examples prepared as in training."""
        _, examples = lamp.parse_examples(questions, None, self.task, questions_source=source)
        return list(experiment_lib.prepare(self.experiment.config, examples))

    def example(self, text: str, profile: Sequence[Mapping[str, Any]] = (),
                question_id: str = "input") -> lamp.Example:
        """One question from an input text and a LaMP profile."""
        record = {"id": question_id, "input": task_input(self.task, text), "profile": list(profile)}
        return self.examples([record], source="--input/--profile")[0]

    def with_histories(self, examples: Sequence[lamp.Example], progress: bool = False):
        """The experiment with a history table holding these examples' texts."""
        texts = (text for e in examples for text in e.history)
        return dataclasses.replace(self.experiment, table=self.texts.table(texts, progress))

    # ------------------------------------------------------------------------------ answers

    @functools.cached_property
    def _generate_fn(self):
        return evaluate.make_generate_fn(self.experiment)

    @functools.cached_property
    def _label_nll_fn(self):
        return evaluate.make_label_nll_fn(self.experiment)

    def answer(self, examples: Sequence[lamp.Example], progress: bool = False) -> list[str]:
        """The personalized answers, decoded as the run's config.decode says."""
        return evaluate.answer(self.with_histories(examples, progress), self.plug_params,
                               examples, desc="personalizing", generate_fn=self._generate_fn,
                               label_nll_fn=self._label_nll_fn)

    def greedy_tokens(self, examples: Sequence[lamp.Example], max_new_tokens: int
                      ) -> list[list[int]]:
        """Greedy continuations as token ids, ended before the end-of-turn token."""
        exp = self.with_histories(examples)
        generate = jax.jit(lambda llm_params, params, batch: exp.llm.generate(
            llm_params, evaluate._soft_tokens(exp, params, batch), batch, method="greedy",
            max_new_tokens=max_new_tokens))
        rows = []
        for batch in evaluate.eval_batches(exp, examples):
            tokens = np.asarray(generate(exp.llm_params, self.plug_params, batch))
            rows.extend(decode.strip_after_eos(tokens[batch["example_mask"]], exp.llm.eos_id))
        return [list(map(int, row)) for row in rows]

    # ---------------------------------------------------------------------- input embeddings

    @functools.cached_property
    def _embeds_fn(self):
        exp = self.experiment
        if not isinstance(exp.llm, llm_lib.DecoderOnlyLM):
            raise MismatchError("input embeddings are emitted for decoder-only LLMs; this plug's "
                                f"LLM is a {export.llm_family(exp.llm)}")

        def embeds(llm_params, plug_params, batch):
            soft = evaluate._soft_tokens(exp, plug_params, batch)
            tokens = jnp.take(exp.llm.embedding_table(llm_params), batch["tokens"], axis=0)
            return llama.splice_prefix(tokens, batch["mask"], soft, None, exp.llm.insert_at)

        return jax.jit(embeds)

    def input_embeddings(self, examples: Sequence[lamp.Example], progress: bool = False
                         ) -> tuple[np.ndarray, np.ndarray]:
        """([N, L, D] float32 input embeddings, [N, L] int64 attention mask), left-padded: the
        prompt's token embeddings with the soft tokens spliced in as the LLM module splices them
        (`embedded_prefix` at `insert_at`)."""
        exp = self.with_histories(examples, progress)
        embeds, masks = [], []
        for batch in evaluate.eval_batches(exp, examples):
            x, mask = map(np.asarray, self._embeds_fn(exp.llm_params, self.plug_params, batch))
            real = batch["example_mask"]
            embeds.append(x[real].astype(np.float32))
            masks.append(mask[real])
        if not embeds:
            return np.zeros((0, 0, exp.llm.width), np.float32), np.zeros((0, 0), np.int64)
        x, mask = np.concatenate(embeds), np.concatenate(masks)
        # Right-padded rows (the real slots are a prefix) -> left-padded, as runtimes generate.
        shifts = mask.shape[1] - mask.sum(axis=1)
        for i, shift in enumerate(shifts):
            x[i], mask[i] = np.roll(x[i], shift, axis=0), np.roll(mask[i], shift)
        return x, mask.astype(np.int64)

    def emit_embeddings(self, path: str | Path, examples: Sequence[lamp.Example]) -> Path:
        """Writes `input_embeddings` of the examples as safetensors (see the module doc)."""
        from safetensors.numpy import save_file

        embeds, mask = self.input_embeddings(examples, progress=True)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"question_ids": json.dumps([e.id for e in examples]), "padding": "left",
                    "llm": str(self.experiment.config.llm.path), "task": self.task.name,
                    "soft_tokens": str(self.experiment.embedder.num_soft_tokens),
                    "insert_at": str(self.experiment.llm.insert_at)}
        save_file({"inputs_embeds": embeds, "attention_mask": mask}, str(path), metadata=metadata)
        return path


# ------------------------------------------------------------------------------------- command

PLUG = flags.DEFINE_string("plug", None, "An exported plug (a training run's <workdir>/plug).")
PROFILE = flags.DEFINE_string("profile", None,
                              "A JSON file: the user's LaMP profile list, or {\"profile\": [...]}; "
                              "none: an empty history.")
INPUT = flags.DEFINE_string("input", None, "One question's input text; prints the answer.")
QUESTIONS = flags.DEFINE_string("questions", None,
                                "A LaMP questions file; --out receives a LaMP outputs file.")
EMIT_EMBEDS = flags.DEFINE_string("emit_embeds", None,
                                  "A .safetensors file for the input embeddings of the questions.")
CACHE_DIR = flags.DEFINE_string("cache_dir", None,
                                "History-embedding cache; default ~/.cache/plug_jax/history.")


def personalize() -> None:
    if (INPUT.value is None) == (QUESTIONS.value is None):
        raise UsageError("give --input (one question) or --questions (a LaMP questions file)")
    if QUESTIONS.value and not (cli.OUT.value or EMIT_EMBEDS.value):
        raise UsageError("--questions needs --out (LaMP outputs) or --emit_embeds")
    personalizer = Personalizer.load(PLUG.value, cli.CONFIG.value,
                                     CACHE_DIR.value or assets.cache_dir("history"))
    if INPUT.value is not None:
        examples = [personalizer.example(INPUT.value, read_profile(PROFILE.value))]
    else:
        examples = personalizer.examples(lamp._read_json(Path(QUESTIONS.value)), QUESTIONS.value)
    if EMIT_EMBEDS.value:
        path = personalizer.emit_embeddings(EMIT_EMBEDS.value, examples)
        print(f"input embeddings of {len(examples)} question(s) written to {path}",
              file=sys.stderr)
    if INPUT.value is None and not cli.OUT.value:
        return
    outputs = personalizer.answer(examples, progress=INPUT.value is None)
    if cli.OUT.value:
        lamp.write_predictions(cli.OUT.value, personalizer.task.name, [e.id for e in examples],
                               outputs)
        print(f"{len(outputs)} answers written to {cli.OUT.value}", file=sys.stderr)
    if INPUT.value is not None:
        print(outputs[0])


def main(argv: Sequence[str]) -> None:
    del argv
    personalize()


if __name__ == "__main__":
    cli.run(main, "plug")
