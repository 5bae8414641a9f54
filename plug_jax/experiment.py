"""Everything a run builds from its config before training or evaluating, in one place.

`build(config, workdir)` loads the LaMP splits (or writes the synthetic ones into the workdir), the
frozen LLM, the sentence encoder, the history-embedding table (cached) and the user embedder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from plug_jax import embed, llm as llm_lib, plug, sharding
from plug_jax.data import lamp, synthetic
from plug_jax.models import assets, bert, layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Experiment:
    config: ml_collections.ConfigDict
    task: lamp.Task
    splits: dict[str, list[lamp.Example]]
    llm: llm_lib.FrozenLM
    llm_params: Any
    encoder_config: bert.BertConfig
    encoder_params: Any
    query_tokenizer: Any
    table: embed.HistoryTable
    embedder: plug.UserEmbedder
    mesh: Any = None  # where the frozen LLM lives (None: the default device)

    def _init_plug(self, rng: jax.Array):
        history = self.config.data.max_history
        with sharding.without_activation_constraints():  # a batch of one row
            return self.embedder.init(
                rng, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool),
                jnp.zeros((1, history, self.table.width)), jnp.ones((1, history), bool))

    def plug_shardings(self, mesh) -> Any:
        """NamedShardings of the plug parameters, from their logical axis names."""
        _, logical = sharding.abstract_with_axes(self._init_plug, jax.random.key(0))
        return sharding.logical_to_shardings(logical, mesh, self.config.axis_rules)

    def init_plug_params(self, rng: jax.Array, mesh=None):
        """Fresh projectors and instruction vector; the query encoder starts as the encoder."""
        params = dict(layers.unboxed(self._init_plug(rng)["params"]))
        # A copy: the training state is donated to the update, which frees its buffers.
        params["query_encoder"] = jax.tree.map(jnp.copy, self.encoder_params)
        return params if mesh is None else jax.device_put(params, self.plug_shardings(mesh))


def data_dir(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """The LaMP directory to read; synthetic data is written into the workdir on first use."""
    if config.data.dir:
        return Path(config.data.dir)
    synth = config.data.synthetic
    directory = Path(workdir) / "data" / f"synthetic_{config.data.task}_seed{synth.seed}"
    if not (directory / "stats.json").exists():
        synthetic.write_lamp_dir(directory, config.data.task, num_users=synth.num_users,
                                 examples_per_user=synth.examples_per_user,
                                 profile_size=synth.profile_size, seed=synth.seed)
    return directory


def load_splits(config: ml_collections.ConfigDict, workdir: str | Path,
                splits: tuple[str, ...]) -> dict[str, list[lamp.Example]]:
    """The splits whose files exist; an evaluation split without files is skipped, with a note
    (official LaMP has no dev_new), but the training split must be there."""
    directory = data_dir(config, workdir)
    loaded = {}
    for split in splits:
        if split != config.data.train_split and not (directory / f"{split}_questions.json").exists():
            print(f"note: {directory} has no {split}_questions.json: split '{split}' skipped")
            continue
        loaded[split] = lamp.load_split(directory, split, config.data.task)
    return loaded


def load_encoder(encoder: ml_collections.ConfigDict) -> tuple[bert.BertConfig, Any, Path]:
    """(config, params, tokenizer directory) of the sentence encoder.

    'minilm' is the embedded all-MiniLM-L6-v2; 'tiny-bert' a small random BERT with MiniLM's
    tokenizer, for smoke tests; anything else a Hugging Face directory.
    """
    if encoder.path == "tiny-bert":
        directory = assets.minilm_dir()
        config = dataclasses.replace(bert.BertConfig.tiny(encoder.pooling or "mean"),
                                     vocab_size=30522, max_position_embeddings=512)
        return config, bert.init_params(config, jax.random.key(1)), directory
    directory = assets.minilm_dir() if encoder.path == "minilm" else Path(encoder.path)
    config, params = bert.load_bert(directory, jnp.float32, encoder.pooling or None)
    return config, params, directory


def history_table(config: ml_collections.ConfigDict, workdir: str | Path,
                  examples: dict[str, list[lamp.Example]], encoder_config: bert.BertConfig,
                  encoder_params: Any, encoder_dir: Path, progress: bool = True
                  ) -> embed.HistoryTable:
    """Frozen embeddings of every history text of these splits, from the cache when it has them."""
    history_encoder = bert.SentenceEncoder(encoder_config, encoder_params,
                                           bert.bert_tokenizer(encoder_dir),
                                           max_length=config.encoder.max_length)
    encoder_id = (f"{config.encoder.path}|{encoder_dir.resolve()}|{encoder_config.pooling}|"
                  f"{config.encoder.max_length}")
    return embed.build_history_table(
        (e.history for split in examples.values() for e in split), history_encoder,
        encoder_config.hidden_size, encoder_id, config.data.cache_dir or Path(workdir) / "cache",
        progress=progress)


def build(config: ml_collections.ConfigDict, workdir: str | Path,
          splits: tuple[str, ...] | None = None, progress: bool = True, mesh=None) -> Experiment:
    """With a mesh, the frozen LLM is loaded straight into its shardings.

    Whatever logical axis rules the caller has set are off in here: model inits and the history
    embedding run batches (of one row, of a power of two) that a sharded batch axis need not
    divide; the LLM's shardings come from config.axis_rules explicitly.
    """
    data = config.data
    if splits is None:
        splits = (data.train_split,) + tuple(data.eval_splits)
    examples = load_splits(config, workdir, splits)
    with sharding.without_activation_constraints():
        encoder_config, encoder_params, encoder_dir = load_encoder(config.encoder)
        table = history_table(config, workdir, examples, encoder_config, encoder_params,
                              encoder_dir, progress)
        llm, llm_params = llm_lib.load_llm(config.llm.path, _DTYPES[config.llm.dtype],
                                           config.llm.soft_token_position, config.llm.remat,
                                           mesh=mesh, rules=config.axis_rules)
    embedder = plug.UserEmbedder(
        encoder_config=encoder_config, llm_width=llm.width,
        soft_token_rms=plug.embedding_rms(llm.embedding_table(llm_params)),
        projector_hidden=config.plug.projector_hidden,
        train_query_encoder=config.plug.train_query_encoder)
    return Experiment(config=config, task=lamp.get_task(data.task), splits=examples, llm=llm,
                      llm_params=llm_params, encoder_config=encoder_config,
                      encoder_params=encoder_params, query_tokenizer=bert.bert_tokenizer(encoder_dir),
                      table=table, embedder=embedder, mesh=mesh)
