"""The one way from a config to the objects of a run: every command builds through `build`.

`build(config, workdir)` loads the LaMP splits (or writes the synthetic ones into the workdir), the
frozen LLM, the sentence encoder, the history-embedding table (cached) and the user embedder.
`build(config, abstract=True)` gives the same objects with ShapeDtypeStructs for every weight and
no data: what `plug_jax.plan` compiles from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from plug_jax import errors, llm as llm_lib, methods, plug, sharding
from plug_jax.data import history as history_lib, lamp, synthetic
from plug_jax.models import assets, bert, layers
from plug_jax.models.loading import read_hf_config


@dataclasses.dataclass
class Experiment:
    config: ml_collections.ConfigDict
    task: lamp.Task
    splits: dict[str, Sequence[lamp.Example]]  # lists, or TFDS splits read on demand
    llm: llm_lib.FrozenLM
    llm_params: Any                 # arrays, or ShapeDtypeStructs when abstract
    encoder_config: bert.BertConfig
    encoder_params: Any
    query_tokenizer: Any            # None when abstract and the encoder is known by name only
    table: history_lib.HistoryTable | None  # None without data
    embedder: plug.UserEmbedder
    mesh: Any = None                # where the frozen LLM lives (None: the default device)
    encoder_dir: Path | None = None  # the encoder's tokenizer (and checkpoint) directory

    def text_cache(self, cache_dir: str | Path | None) -> history_lib.TextEmbeddingCache:
        """A per-text cache of history embeddings, for histories that no split holds (users
        served one request at a time); keyed by the encoder, its weights' fingerprint included."""
        fingerprint = plug.encoder_embedding_rms(self.encoder_params)
        return history_lib.TextEmbeddingCache(
            history_encoder(self.config, self.encoder_config, self.encoder_params,
                            self.encoder_dir),
            self.encoder_config.hidden_size,
            f"{encoder_id(self.config, self.encoder_config, self.encoder_dir)}|{fingerprint:.6g}",
            cache_dir)

    def _init_plug(self, rng: jax.Array):
        history = self.config.data.max_history
        with sharding.without_activation_constraints():  # a batch of one row
            return self.embedder.init(
                rng, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool),
                jnp.zeros((1, history, self.encoder_config.hidden_size)),
                jnp.ones((1, history), bool))

    def abstract_plug_params(self) -> tuple[Any, Any]:
        """(ShapeDtypeStructs, logical PartitionSpecs) of the plug parameters."""
        # The key itself abstract: under `plan --compiler tpu` the default devices are
        # compile-only TPUs, which cannot hold a concrete array.
        return sharding.abstract_with_axes(self._init_plug, jax.eval_shape(jax.random.key, 0))

    def plug_shardings(self, mesh) -> Any:
        """NamedShardings of the plug parameters, from their logical axis names."""
        return sharding.logical_to_shardings(self.abstract_plug_params()[1], mesh,
                                             self.config.axis_rules)

    def llm_shardings(self, mesh) -> Any:
        return sharding.logical_to_shardings(self.llm.param_logical_axes(), mesh,
                                             self.config.axis_rules)

    def init_plug_params(self, rng: jax.Array, mesh=None):
        """Fresh projectors and instruction vector; the query encoder starts as the encoder."""
        def fresh(rng):  # one program, in which the query encoder's random init is dead code
            params = layers.unboxed(self._init_plug(rng)["params"])
            return {name: value for name, value in params.items() if name != "query_encoder"}

        params = jax.jit(fresh)(rng)
        if self.embedder.encodes_query:
            # A copy: the training state is donated to the update, which frees its buffers.
            params["query_encoder"] = jax.tree.map(jnp.copy, self.encoder_params)
        return params if mesh is None else jax.device_put(params, self.plug_shardings(mesh))


def data_dir(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """The LaMP directory to read; synthetic data is written into the workdir on first use."""
    if config.data.dir:
        return epath.Path(config.data.dir)
    synth = config.data.synthetic
    directory = epath.Path(workdir) / "data" / f"synthetic_{config.data.task}_seed{synth.seed}"
    if not (directory / "stats.json").exists():
        synthetic.write_lamp_dir(directory, config.data.task, num_users=synth.num_users,
                                 examples_per_user=synth.examples_per_user,
                                 profile_size=synth.profile_size, seed=synth.seed)
    return directory


def _split_reader(config: ml_collections.ConfigDict, workdir: str | Path, directory: Path
                  ) -> Callable[[str], Sequence[lamp.Example]]:
    """split -> its examples: a list read from the JSON files (data.source "json"), or a TFDS
    array_record split read on demand (data.source "tfds"; prepared once into data.tfds_dir,
    default <workdir>/tfds), for a LaMP directory too large to hold in memory."""
    source = config.data.get("source", "json")
    if source == "json":
        return lambda split: lamp.load_split(directory, split, config.data.task)
    if source != "tfds":
        raise errors.ConfigError(f"config.data.source {source!r}: expected 'json' or 'tfds'")
    from plug_jax.data import tfds_lamp  # TFDS only for this source

    tfds_dir = config.data.get("tfds_dir") or epath.Path(workdir) / "tfds"
    # Process 0 prepares; the others then find the data prepared (or prepare their host's copy).
    if jax.process_index() == 0:
        builder = tfds_lamp.prepare(directory, tfds_dir, config.data.task)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tfds_lamp.prepare")
    if jax.process_index() != 0:
        builder = tfds_lamp.prepare(directory, tfds_dir, config.data.task)
    return lambda split: tfds_lamp.data_source(builder, split)


def load_splits(config: ml_collections.ConfigDict, workdir: str | Path,
                splits: tuple[str, ...]) -> dict[str, Sequence[lamp.Example]]:
    """The splits whose files exist; an evaluation split without files is skipped, with a note
    (official LaMP has no dev_new), but the training split must be there, with its outputs."""
    directory = data_dir(config, workdir)
    if not directory.is_dir():
        raise errors.MissingFileError(f"config.data.dir: {directory} is not a directory")
    read = _split_reader(config, workdir, directory)
    loaded = {}
    for split in splits:
        if split != config.data.train_split and not (directory / f"{split}_questions.json").exists():
            print(f"note: {directory} has no {split}_questions.json: split '{split}' skipped")
            continue
        examples = read(split)
        if split == config.data.train_split and examples[0].target is None:
            raise lamp.LampFormatError(
                f"{directory}: no {split}_outputs.json: the training split needs its outputs")
        loaded[split] = prepare(config, examples)
    return loaded


def prepare(config: ml_collections.ConfigDict,
            examples: Sequence[lamp.Example]) -> Sequence[lamp.Example]:
    """The examples as the config's recipe shows them to the plug and the LLM: a list becomes a
    list; any other sequence (a TFDS split) a `lamp.MappedExamples` that applies the recipe on
    each read.

    data.history_labels: each history text starts with its item's label (LaMP-2 tag, LaMP-3
    score), so the persona can see the user's habits, not only their words.
    A retrieval method (config.method): the LLM input starts with the user's top
    data.retrieval_k history items by BM25 in LaMP's retrieval prompt format (sized to
    data.max_input_tokens, about 4 characters a token); the plug's query stays the bare input.
    """
    task = lamp.get_task(config.data.task)
    steps = []
    if config.data.history_labels and task.label_field:
        steps.append(lambda e: dataclasses.replace(e, history=tuple(
            f"{task.label_field} {label}: {text}"
            for label, text in zip(e.history_labels, e.history))))
    if methods.get(config.method).retrieval:
        from plug_jax import baselines  # bm25s only for retrieval recipes

        max_chars = 4 * config.data.max_input_tokens
        steps.append(lambda e: dataclasses.replace(e, input=baselines.retrieval_prompt(
            task, e, config.data.retrieval_k, max_chars=max_chars)))

    def recipe(example: lamp.Example) -> lamp.Example:
        for step in steps:
            example = step(example)
        return example

    if isinstance(examples, list):
        return [recipe(e) for e in examples] if steps else examples
    return lamp.MappedExamples(examples, recipe if steps else None)


def _encoder_source(encoder: ml_collections.ConfigDict) -> tuple[bert.BertConfig | None, Path | None]:
    """(config when it is known without a checkpoint, checkpoint directory when there is one).

    'minilm' is the embedded all-MiniLM-L6-v2; 'tiny-bert' a small random BERT with MiniLM's
    tokenizer, for smoke tests; a bge-*-en-v1.5 name plans without weights; anything else is a
    Hugging Face directory.
    """
    if encoder.path == "tiny-bert":
        config = dataclasses.replace(bert.BertConfig.tiny(encoder.pooling or "mean"),
                                     vocab_size=30522, max_position_embeddings=512)
        return config, assets.minilm_dir()
    directory = assets.minilm_dir() if encoder.path == "minilm" else Path(encoder.path)
    if directory.is_dir():
        return None, directory
    named = bert.NAMED_CONFIGS.get(encoder.path.rstrip("/").rsplit("/", 1)[-1].lower())
    if named is None:
        raise errors.MissingFileError(
            f"config.encoder.path: {encoder.path} is not a directory ('minilm' for the embedded "
            f"default; names known without weights: {', '.join(bert.NAMED_CONFIGS)})")
    return dataclasses.replace(named, pooling=encoder.pooling or named.pooling), None


def load_encoder(encoder: ml_collections.ConfigDict, abstract: bool = False
                 ) -> tuple[bert.BertConfig, Any, Path | None]:
    """(config, params or their ShapeDtypeStructs, tokenizer directory) of the sentence encoder."""
    config, directory = _encoder_source(encoder)
    if config is not None:  # tiny or named
        if abstract:
            return config, bert.abstract_params(config), directory
        if encoder.path != "tiny-bert":
            raise errors.MissingFileError(f"config.encoder.path: {encoder.path} names an encoder whose "
                                    "weights are not here; point it at a local directory")
        return config, bert.init_params(config, jax.random.key(1)), directory
    if abstract:
        config = bert.BertConfig.from_hf(read_hf_config(directory), encoder.pooling or None,
                                         directory=directory)
        return config, bert.abstract_params(config), directory
    config, params = bert.load_bert(directory, jnp.float32, encoder.pooling or None)
    return config, params, directory


def history_encoder(config: ml_collections.ConfigDict, encoder_config: bert.BertConfig,
                    encoder_params: Any, encoder_dir: Path) -> bert.SentenceEncoder:
    return bert.SentenceEncoder(encoder_config, encoder_params, bert.bert_tokenizer(encoder_dir),
                                max_length=config.encoder.max_length)


def encoder_id(config: ml_collections.ConfigDict, encoder_config: bert.BertConfig,
               encoder_dir: Path) -> str:
    """What the history embeddings depend on: the cache key of the history encoder."""
    return (f"{config.encoder.path}|{encoder_dir.resolve()}|{encoder_config.pooling}|"
            f"{config.encoder.max_length}")


def history_table(config: ml_collections.ConfigDict, workdir: str | Path,
                  examples: dict[str, Sequence[lamp.Example]], encoder_config: bert.BertConfig,
                  encoder_params: Any, encoder_dir: Path, progress: bool = True
                  ) -> history_lib.HistoryTable:
    """Frozen embeddings of every history text of these splits, from the cache when it has them."""
    return history_lib.build_history_table(
        (e.history for split in examples.values() for e in split),
        history_encoder(config, encoder_config, encoder_params, encoder_dir),
        encoder_config.hidden_size, encoder_id(config, encoder_config, encoder_dir),
        config.data.cache_dir or epath.Path(workdir) / "cache", progress=progress)


def build(config: ml_collections.ConfigDict, workdir: str | Path | None = None, *,
          splits: tuple[str, ...] | None = None, abstract: bool = False, with_llm: bool = True,
          progress: bool = True, mesh=None,
          check: Callable[[Experiment], None] | None = None) -> Experiment:
    """Everything a command needs, from the config.

    Every input (a LaMP directory, the LLM, the encoder) is read and checked before anything is
    written (synthetic data, the history cache), so bad input leaves the workdir as it was.
    check(experiment without data) runs in between: a command's own refusal (it raises).

    abstract: shapes only (no weights, no data, no workdir); splits=() reads no data either.
    with_llm=False leaves the LLM out
    (`plug_jax.embed` needs only data and encoder; then `llm`, `llm_params` and `embedder` are
    None). With a mesh, the frozen LLM is loaded straight into its shardings.

    Whatever logical axis rules the caller has set are off in here: model inits and the history
    embedding run batches (of one row, of a power of two) that a sharded batch axis need not
    divide; the LLM's shardings come from config.axis_rules explicitly.
    """
    data = config.data
    task, method = lamp.get_task(data.task), methods.get(config.method)
    plug.check_config(config.plug)
    if splits is None:
        splits = (data.train_split,) + tuple(data.eval_splits)
    with_data = not abstract and bool(splits)
    examples = load_splits(config, workdir, splits) if with_data and data.dir else {}
    with sharding.without_activation_constraints():
        encoder_config, encoder_params, encoder_dir = load_encoder(config.encoder, abstract)
        llm = llm_params = embedder = None
        if with_llm:
            llm, llm_params = llm_lib.build_llm(config.llm, abstract=abstract, mesh=mesh,
                                                rules=config.axis_rules)
            soft_token = plug.soft_token_fields(
                config.plug, None if abstract else llm.embedding_table(llm_params))
            embedder = plug.UserEmbedder(
                encoder_config=encoder_config, llm_width=llm.width, **soft_token,
                projector_hidden=config.plug.projector_hidden,
                train_query_encoder=config.plug.train_query_encoder,
                persona_tokens=config.plug.persona_tokens if method.plug == "persona" else 0,
                input_tokens=int(config.plug.get("input_tokens", 0)),
                param_init=config.plug.param_init,
                attention_scale=float(config.plug.get("attention_scale", 1.0)),
                learn_attention_scale=bool(config.plug.get("learn_attention_scale", False)),
                dropout_rate=float(config.plug.get("dropout", 0.0)))
        experiment = Experiment(
            config=config, task=task, splits=examples, llm=llm, llm_params=llm_params,
            encoder_config=encoder_config, encoder_params=encoder_params,
            query_tokenizer=encoder_dir and bert.bert_tokenizer(encoder_dir), table=None,
            embedder=embedder, mesh=mesh, encoder_dir=encoder_dir)
        if check is not None:
            check(experiment)
        # ------------------------------------------------ writes: synthetic data, history cache
        if with_data:
            if not data.dir:
                experiment.splits = load_splits(config, workdir, splits)
            experiment.table = history_table(config, workdir, experiment.splits, encoder_config,
                                             encoder_params, encoder_dir, progress)
    return experiment
