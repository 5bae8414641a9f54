"""Shared configuration of the LaMP tasks; each `configs/lampN.py` calls `lamp_config`.

Two settings:
  (no arg)  the embedded default: SmolLM2-135M-Instruct (GGUF) + all-MiniLM-L6-v2 + synthetic LaMP
            data of the task, sized to finish on a 2-core CPU in minutes, fully offline.
  tiny      small random LLM and encoder with the real tokenizers: a smoke test in seconds.
  paper     the reference recipe, rucliujn/PPlug (code/run_all_t5.sh, main_profile.py,
            ModelForPer.py, PersonalDataset_profile.py, aggr_id.py): Flan-T5-XXL + bge-base-en-v1.5
            (CLS), a real (time-based) LaMP directory, AdamW lr 1e-4, weight decay 1e-4 off biases
            and LayerNorms, warmup ceil(5%), linear decay, no clipping, batch 64, 2 epochs (LaMP-3:
            1), LLM input <= 256 tokens, query <= 276 tokens cut from the truncated input (LaMP-1:
            the title), history <= 512 items, 10 augmented copies dropping 1..ceil(n/2) of all
            items, soft tokens x539.97 (instruction /7), beam 4, max new/target tokens 128
            (LaMP-3: 10), dropout 0.1 in the frozen T5 and the bge query encoder while training
            (train mode, as the reference's Trainer runs them; evaluation is deterministic).
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
        source="json",             # 'json': read into memory | 'tfds': array_record, read on demand
        tfds_dir="",               # where 'tfds' prepares the directory; empty: <workdir>/tfds
        task=task,
        train_split="train",
        eval_splits=("dev", "dev_new"),  # dev_new: users never seen in training (skipped if absent)
        # LaMP-3's augmented copy doubles the examples: half the questions keep the demo's steps
        synthetic=dict(num_users=128, examples_per_user=2 if task == "LaMP_3" else 4,
                       profile_size=8, seed=0),
        max_history=32,            # the most recent items the aggregator attends to
        max_input_tokens=96,       # LLM input (without soft tokens), truncated from the end
        max_target_tokens=16,
        max_query_tokens=96,
        # extra copies of each training example with history dropped; LaMP-3 takes one: three
        # seeds on real users measured it better on 11 of 12 figures (README)
        augment_copies=1 if task == "LaMP_3" else 0,
        history_labels=True,       # history texts start with their label (LaMP-2 tag, LaMP-3 score)
        retrieval_k=4,             # history items BM25 writes into the prompt (methods *bm25*)
        augment_from="recent",     # their drop pool: 'recent' (max_history) | 'all' (reference)
        query_from="input",        # query cut from the 'input' | 'truncated_input' (reference)
        lamp1_query="title_and_refs",  # LaMP-1's query: 'title_and_refs' | 'title' (reference)
        cache_dir="",              # history-embedding cache; empty: <workdir>/cache
        max_eval_examples=0,       # 0: all
    )
    config.llm = dict(
        path="smollm2",            # 'smollm2' (embedded GGUF), an HF directory, or a .gguf file
        dtype="float32",           # compute / storage dtype of the frozen LLM; 'bfloat16' sums its
                                   # products in float32 on a CPU: 0.68x the update with AVX512-BF16 (README)
        soft_token_position="after_chat_header",  # or 'start' (a decoder-only LLM ignores it there)
        remat=False,               # recompute each layer in the backward pass: less memory, more FLOPs
        remat_policy="",           # what remat keeps: '' nothing | 'dots_with_no_batch_dims_saveable' ...
        attention_impl="",         # '' JAX chooses | 'xla' | 'cudnn' (GPU flash attention, bf16) | 'einsum'
        dropout=0.0,               # in the training loss, weights frozen (T5: all; Llama: attention)
    )
    config.encoder = dict(
        path="minilm",             # 'minilm' (embedded) or an HF directory (bge-base-en-v1.5, ...)
        pooling="",                # '' = from the checkpoint (sentence-transformers config), 'cls', 'mean'
        query_instruction="",
        max_length=128,
    )
    config.plug = dict(
        projector_hidden=0,
        train_query_encoder=True,
        soft_token_scale="rms",    # 'rms' (ours) | 'reference': x N, instruction x N / 7, learnable
        soft_token_norm=0.0,       # N; 0: the LLM's mean token-embedding norm (T5-XXL: ~539.97)
        param_init="default",      # 'default' | 'torch' (reference: nn.Linear kernels, torch.rand)
        dropout=0.0,               # the query encoder's, in the training loss (the projectors have none)
        persona_tokens=1,          # soft tokens the persona takes
        attention_scale=1.0,       # the aggregator's softmax of cosines x this (reference: 1)
        learn_attention_scale=False,  # train log(attention_scale)
        # soft tokens read from the input's query embedding (reference: 0); 1 for LaMP-3, where
        # three seeds on real users measured it better on every figure; on LaMP-4 worse (README)
        input_tokens=1 if task == "LaMP_3" else 0,
    )
    config.optim = dict(
        lr=2e-3,                   # projectors + instruction vector
        encoder_lr=5e-5,           # the trainable query encoder
        weight_decay=1e-4,
        warmup_fraction=0.05,
        batch_size=8,
        grad_accum_steps=1,
        epochs=1.0,
        max_steps=0,               # 0: run the epochs
        grad_clip=1.0,
        weight_decay_mask="all",   # 'all' | 'no_bias_norm' (Hugging Face Trainer, the reference)
        warmup_rounding="floor",   # warmup steps: 'floor' | 'ceil' (Hugging Face Trainer)
    )
    # method: 'greedy', 'beam', or 'score': a task with labels (LaMP-1/2/3) answers with a label
    # chosen from their likelihoods, which needs one pass over the prompt instead of generating.
    # label_choice: 'likeliest'; for LaMP-3's scores 'median' (least expected absolute error)
    # or 'mean' (least expected squared error): plug_jax.evaluate.choose_labels.
    config.decode = dict(method="score" if lamp.get_task(task).labels else "greedy",
                         label_choice=("median" if lamp.get_task(task).kind == "regression"
                                       else "likeliest"),
                         num_beams=4,
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
        config.data.augment_copies = 0  # the smoke runs' few steps see each question once
        config.data.max_query_tokens = 64
        config.optim.update(max_steps=6, batch_size=4)
        config.decode.update(max_new_tokens=3, eval_batch_size=8)
        config.log_every = 2
    if args.paper:
        config.data.dir = f"data/{task}"
        config.data.max_history = 512
        config.data.max_input_tokens = 256
        config.data.max_target_tokens = 10 if task == "LaMP_3" else 128  # = max_new_len
        config.data.max_query_tokens = 256 + 20  # max_input_len + 20
        config.data.augment_copies = 10
        config.data.update(augment_from="all", query_from="truncated_input", lamp1_query="title",
                           history_labels=False)
        config.llm.path = "google/flan-t5-xxl"  # a local HF directory
        config.llm.dtype = "bfloat16"
        config.llm.soft_token_position = "start"
        config.llm.remat = True
        config.llm.dropout = 0.1  # T5 dropout_rate, in train mode
        config.encoder.path = "BAAI/bge-base-en-v1.5"  # a local HF directory
        config.encoder.pooling = "cls"
        config.encoder.query_instruction = "Represent this sentence for searching relevant passages:"
        config.encoder.max_length = 512
        config.plug.update(soft_token_scale="reference", soft_token_norm=0.0, param_init="torch",
                           input_tokens=0,
                           dropout=0.1)  # bge-base hidden and attention dropout, in train mode
        config.optim.update(lr=1e-4, encoder_lr=1e-4, weight_decay=1e-4, warmup_fraction=0.05,
                            batch_size=64, epochs=1.0 if task == "LaMP_3" else 2.0, max_steps=0,
                            grad_clip=0.0, weight_decay_mask="no_bias_norm",
                            warmup_rounding="ceil")
        config.decode.update(method="beam", label_choice="likeliest", num_beams=4,
                             max_new_tokens=10 if task == "LaMP_3" else 128, eval_batch_size=64)
        config.mesh = dict(data=1, fsdp=-1, tensor=1)
        config.log_every = 50
    return config
