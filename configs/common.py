"""Shared configuration of the LaMP tasks; each `configs/lampN.py` calls `lamp_config`.

Two settings:
  (no arg)  the embedded default: SmolLM2-135M-Instruct (GGUF) + all-MiniLM-L6-v2 + synthetic LaMP
            data of the task, sized to finish on a 2-core CPU in minutes, fully offline.
  tiny      small random LLM and encoder with the real tokenizers: a smoke test in seconds.
  paper     the paper's setting: Flan-T5-XXL + bge-base-en-v1.5 (CLS), a real LaMP directory, AdamW
            lr 1e-4, weight decay 1e-4, 5% warmup, batch 64, 2 epochs (LaMP-3: 1), LLM input <= 256
            tokens, history <= 512 items, beam 4, max new tokens 128 (LaMP-3: 10).
Single fields override from the command line: --config.optim.lr=3e-4 --config.data.dir=PATH.
"""

from __future__ import annotations

import ml_collections

from plug_jax.data import lamp

# Logical axis name -> mesh axes. Parameters shard over fsdp (and tensor for the wide dims);
# activations' batch over data and fsdp.
AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("encoder_embed", None),
    ("encoder_vocab", None),       # bge's 30522 rows divide by no mesh axis worth having
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("length", None),
    ("kv", None),
    ("norm", None),
    ("relpos_buckets", None),
    ("positions", None),
    ("types", None),
    ("history", None),
)



def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'paper,steps=10' -> {'paper': True, 'steps': 10}; a bare word sets a boolean flag."""
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config arg '{key}' is not one of {sorted(defaults)}")
        parsed[key] = type(defaults[key])(value) if value else True
    return parsed


def lamp_config(task: str, arg: str | None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, paper=False, tiny=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = task
    config.method = "pplug"        # or an ablation or baseline: plug_jax/methods.py

    config.data = dict(
        dir="",                    # a LaMP directory; empty: generate synthetic data (the default)
        task=task,
        train_split="train",
        eval_splits=("dev", "dev_new"),  # dev_new: users never seen in training (skipped if absent)
        synthetic=dict(num_users=128, examples_per_user=4, profile_size=8, seed=0),
        max_history=32,            # the most recent items the aggregator attends to
        max_input_tokens=96,       # LLM input (without soft tokens), truncated from the end
        max_target_tokens=16,
        max_query_tokens=96,
        augment_copies=0,          # extra copies of each training example with history dropped
        history_labels=False,      # history texts start with their label (LaMP-2 tag, LaMP-3 score)
        retrieval_k=4,             # history items BM25 writes into the prompt (methods *bm25*)
        cache_dir="",              # history-embedding cache; empty: <workdir>/cache
        max_eval_examples=0,       # 0: all
    )
    config.llm = dict(
        path="smollm2",            # 'smollm2' (embedded GGUF), an HF directory, or a .gguf file
        dtype="float32",           # compute / storage dtype of the frozen LLM
        soft_token_position="after_chat_header",  # or 'start' (a decoder-only LLM ignores it there)
        remat=False,               # recompute each layer in the backward pass: less memory, more FLOPs
    )
    config.encoder = dict(
        path="minilm",             # 'minilm' (embedded) or an HF directory (bge-base-en-v1.5, ...)
        pooling="",                # '' = from the checkpoint (sentence-transformers config), 'cls', 'mean'
        query_instruction="",
        max_length=128,
    )
    config.plug = dict(projector_hidden=0, train_query_encoder=True,
                       persona_tokens=1)   # soft tokens the persona takes
    config.optim = dict(
        lr=2e-3,                   # projectors + instruction vector
        encoder_lr=5e-5,           # the trainable query encoder
        weight_decay=1e-4,
        warmup_fraction=0.05,
        batch_size=8,
        grad_accum_steps=1,
        epochs=2.0,
        max_steps=60,              # 0: run the epochs
        grad_clip=1.0,
    )
    # method: 'greedy', 'beam', or 'score' (classification tasks: the most likely label)
    config.decode = dict(method="greedy", num_beams=4,
                         max_new_tokens=lamp.get_task(task).max_new_tokens,
                         eval_batch_size=16)
    config.checkpoint = dict(save_every=200, max_to_keep=3, async_save=True)
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.axis_rules = AXIS_RULES
    config.log_every = 5

    if args.tiny:
        config.llm.path = "tiny-llama"
        config.encoder.path = "tiny-bert"
        config.data.synthetic.update(num_users=24, examples_per_user=3, profile_size=4)
        config.data.max_history = 8
        config.data.max_query_tokens = 64
        config.optim.update(max_steps=6, batch_size=4)
        config.decode.update(max_new_tokens=3, eval_batch_size=8)
        config.log_every = 2
    if args.paper:
        config.data.dir = f"data/{task}"
        config.data.max_history = 512
        config.data.max_input_tokens = 256
        config.data.max_target_tokens = 128
        config.data.max_query_tokens = 512
        config.data.augment_copies = 10
        config.llm.path = "google/flan-t5-xxl"  # a local HF directory
        config.llm.dtype = "bfloat16"
        config.llm.soft_token_position = "start"
        config.llm.remat = True
        config.encoder.path = "BAAI/bge-base-en-v1.5"  # a local HF directory
        config.encoder.pooling = "cls"
        config.encoder.query_instruction = "Represent this sentence for searching relevant passages: "
        config.encoder.max_length = 512
        config.optim.update(lr=1e-4, encoder_lr=1e-4, weight_decay=1e-4, warmup_fraction=0.05,
                            batch_size=64, epochs=1.0 if task == "LaMP_3" else 2.0, max_steps=0)
        config.decode.update(method="beam", num_beams=4,
                             max_new_tokens=10 if task == "LaMP_3" else 128, eval_batch_size=64)
        config.mesh = dict(data=1, fsdp=-1, tensor=1)
        config.log_every = 50
    return config
