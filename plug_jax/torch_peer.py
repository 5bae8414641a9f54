"""The PPlug training step the PyTorch way the reference runs it, for `plug_jax.bench`.

A frozen transformers `LlamaForCausalLM` (requires_grad False) fed `inputs_embeds` with the soft
tokens spliced where ours go, a PyTorch plug of the same shapes (a transformers `BertModel` query
encoder, Linear-GELU-Linear projectors, an instruction vector), the same target-token loss and
AdamW (with clipping and the warmup/decay schedule) on the plug alone.

Both models take their weights from ours (our parameter trees written out under Hugging Face
names through the loading rules), so the peer computes the same function as our step on the same
batch: `loss` agrees with `train.loss_fn` to float32 rounding.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
import torch
import transformers
from flax import traverse_util
from torch import nn

from plug_jax import plug as plug_lib
from plug_jax.models import bert, llama
from plug_jax.models.loading import Rule


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_state_dict(params: Any, rules: Sequence[Rule]) -> dict[str, torch.Tensor]:
    """Our parameter tree -> {Hugging Face name: tensor}: the loading rules run backwards (their
    transforms are transposes, their own inverses)."""
    state = {}
    for path, value in traverse_util.flatten_dict(params, sep="/").items():
        for pattern, template, transform in rules:
            match = re.fullmatch(pattern, path)
            if match:
                array = np.asarray(value, np.float32)
                state[template.format(*match.groups())] = torch.from_numpy(
                    np.array(transform(array) if transform else array, order="C"))  # a copy
                break
        else:
            raise KeyError(f"no loading rule for parameter '{path}'")
    return state


def _load(module: nn.Module, state: dict[str, torch.Tensor], may_miss: Sequence[str] = ()):
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [name for name in missing if name not in may_miss]
    if missing or unexpected:
        raise KeyError(f"{type(module).__name__}: missing {missing}, unexpected {unexpected}")


def hf_llama(config: llama.LlamaConfig, params: Any) -> transformers.LlamaForCausalLM:
    """A frozen transformers Llama with our LLM's weights, in their dtype (the reference trains
    with `--bf16 True`)."""
    if config.rope_llama3_scaling is not None:
        raise NotImplementedError("the torch peer builds default-RoPE Llamas only")
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=config.attention_bias)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    _load(model, hf_state_dict(params, llama.LLAMA_RULES),
          may_miss=("lm_head.weight",) if config.tie_word_embeddings else ())
    model.requires_grad_(False)
    return model.to(_TORCH_DTYPES[np.dtype(jax.tree.leaves(params)[0].dtype).name])


def hf_bert(config: bert.BertConfig, params: Any) -> transformers.BertModel:
    hf_config = transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
        hidden_act=config.hidden_act, pad_token_id=config.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(hf_config, add_pooling_layer=False)
    _load(model, hf_state_dict(params, bert.BERT_RULES))
    return model


def _projector(params: Any) -> nn.Sequential:
    """Our ProjectorMLP (fc1, exact GELU, fc2) as Linear-GELU-Linear."""
    layers = []
    for name in ("fc1", "fc2"):
        kernel = np.asarray(params[name]["kernel"], np.float32)
        linear = nn.Linear(*kernel.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(np.array(params[name]["bias"], np.float32)))
        layers.append(linear)
    return nn.Sequential(layers[0], nn.GELU(), layers[1])


class TorchPlug(nn.Module):
    """plug_jax.plug.UserEmbedder in PyTorch, from its parameters."""

    def __init__(self, embedder: plug_lib.UserEmbedder, params: Any):
        super().__init__()
        self.embedder = embedder
        self.instruction = nn.Parameter(torch.from_numpy(np.asarray(params["instruction"],
                                                                    np.float32).copy()))
        self.instruction_projector = _projector(params["instruction_projector"])
        if embedder.encodes_query:
            self.query_encoder = hf_bert(embedder.encoder_config, params["query_encoder"])
            self.query_encoder.requires_grad_(embedder.train_query_encoder)
        if embedder.input_tokens:
            self.input_projector = _projector(params["input_projector"])
        if embedder.persona_tokens:
            self.persona_projector = _projector(params["persona_projector"])
            self.attention_log_scale = nn.Parameter(torch.tensor(
                float(params["attention_log_scale"]) if embedder.learn_attention_scale
                else math.log(embedder.attention_scale)),
                requires_grad=embedder.learn_attention_scale)

    def forward(self, query_tokens, query_mask, history, history_mask) -> torch.Tensor:
        embedder, batch = self.embedder, history.shape[0]
        soft = self.instruction_projector(self.instruction).expand(batch, 1, -1)
        if embedder.encodes_query:
            hidden = self.query_encoder(input_ids=query_tokens,
                                        attention_mask=query_mask.long()).last_hidden_state
            if embedder.encoder_config.pooling == "cls":
                query = hidden[:, 0]
            else:
                weights = query_mask.float()[..., None]
                query = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            query = query * torch.rsqrt((query * query).sum(-1, keepdim=True).clamp_min(1e-24))
        if embedder.persona_tokens:
            scores = self.attention_log_scale.exp() * torch.einsum("be,bhe->bh", query,
                                  nn.functional.normalize(history, dim=-1, eps=1e-12))
            scores = scores.masked_fill(~history_mask, -math.inf)
            any_history = history_mask.any(-1, keepdim=True)
            weights = torch.softmax(torch.where(any_history, scores, 0.0), dim=-1)
            weights = torch.where(history_mask, weights, 0.0)
            persona = torch.einsum("bh,bhd->bd", weights, self.persona_projector(history))
            soft = torch.cat([soft, persona.reshape(batch, embedder.persona_tokens, -1)], dim=1)
        if embedder.input_tokens:
            read = self.input_projector(query).reshape(batch, embedder.input_tokens, -1)
            soft = torch.cat([soft, read], dim=1)
        if embedder.soft_token_scale == "reference":
            divisors = torch.ones(soft.shape[1])
            divisors[0] = plug_lib.REFERENCE_INSTRUCTION_DIVISOR
            return soft / divisors[:, None] * embedder.soft_token_norm
        rms = torch.sqrt(soft.square().mean(-1, keepdim=True) + 1e-12)
        return soft / rms * embedder.soft_token_rms


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Our featurized batch as tensors: ids as int64, masks as bool, vectors as float32."""
    tensors = {}
    for name, value in batch.items():
        value = np.asarray(value)
        tensors[name] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "iu"
                                         else value.copy())
    return tensors


class TorchPeer:
    """The peer's model, plug and optimizer; `step(batch)` is one update, `loss(batch)` one
    forward pass, of a `to_torch` batch."""

    def __init__(self, exp, plug_params: Any, total_steps: int):
        self.llm = hf_llama(exp.llm.module.config, exp.llm_params)
        self.insert_at = exp.llm.insert_at
        self.plug = TorchPlug(exp.embedder, plug_params)
        optim = exp.config.optim
        self.grad_clip = optim.grad_clip

        def no_decay(name: str) -> bool:
            return optim.get("weight_decay_mask", "all") != "all" and (
                name.endswith("bias") or "LayerNorm" in name)

        groups = []
        for is_encoder, lr in ((False, optim.lr), (True, optim.encoder_lr)):
            for decay in (True, False):
                chosen = [p for name, p in self.plug.named_parameters()
                          if p.requires_grad and name.startswith("query_encoder.") == is_encoder
                          and no_decay(name) != decay]
                if chosen:
                    groups.append({"params": chosen, "lr": lr,
                                   "weight_decay": optim.weight_decay if decay else 0.0})
        self.optimizer = torch.optim.AdamW(groups, eps=1e-8)
        round_warmup = math.ceil if optim.get("warmup_rounding", "floor") == "ceil" else int
        warmup = max(1, round_warmup(optim.warmup_fraction * total_steps))
        decay_steps = max(1, total_steps - warmup)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: step / warmup if step < warmup
            else max(0.0, 1 - (step - warmup) / decay_steps))

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        soft = self.plug(batch["query_tokens"], batch["query_mask"], batch["history"],
                         batch["history_mask"])
        embedded = self.llm.get_input_embeddings()(batch["tokens"])
        at = self.insert_at
        inputs = torch.cat([embedded[:, :at], soft.to(embedded.dtype), embedded[:, at:]], dim=1)
        mask = torch.cat([batch["mask"][:, :at], torch.ones(soft.shape[:2], dtype=torch.bool),
                          batch["mask"][:, at:]], dim=1)
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        hidden = self.llm.model(inputs_embeds=inputs, attention_mask=mask.long(),
                                position_ids=positions).last_hidden_state
        # The LM head at the target slots alone, as ours (the reference's `labels=` path would
        # compute it at every slot).
        slots = batch["target_positions"] + soft.shape[1]
        hidden = torch.take_along_dim(hidden, slots[..., None], dim=1)
        logits = self.llm.lm_head(hidden).float()
        nll = nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                          reduction="none")
        weights = batch["target_mask"].float().flatten()
        count = weights.sum().clamp_min(1.0)
        return (nll * weights).sum() / count, count

    def loss(self, batch: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return float(self._loss(batch)[0])

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss, _ = self._loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.plug.parameters(), self.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        return float(loss.detach())


class TorchDecodePeer:
    """Decoding the way the reference does it: transformers' `generate` on the frozen Llama fed
    `inputs_embeds` (the plug's soft tokens spliced where ours go), left padded, as `generate`
    needs a batch to be."""

    def __init__(self, exp, plug_params: Any):
        self.llm = hf_llama(exp.llm.module.config, exp.llm_params)
        self.insert_at = exp.llm.insert_at
        self.eos_id = exp.llm.eos_id
        self.plug = TorchPlug(exp.embedder, plug_params).eval()

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids + soft tokens -> left-padded (inputs_embeds, attention_mask)."""
        soft = self.plug(batch["query_tokens"], batch["query_mask"], batch["history"],
                         batch["history_mask"])
        embedded = self.llm.get_input_embeddings()(batch["tokens"])
        at, rows = self.insert_at, []
        for row, mask, row_soft in zip(embedded, batch["mask"], soft):
            real = row[mask]
            rows.append(torch.cat([real[:at], row_soft.to(real.dtype), real[at:]]))
        longest = max(len(row) for row in rows)
        inputs = embedded.new_zeros(len(rows), longest, embedded.shape[-1])
        attention = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, row in enumerate(rows):
            inputs[i, longest - len(row):] = row
            attention[i, longest - len(row):] = 1
        return inputs, attention

    def generate(self, batch: dict[str, torch.Tensor], *, method: str, max_new_tokens: int,
                 num_beams: int) -> np.ndarray:
        """[B, max_new_tokens] new tokens, EOS-padded after each row's EOS, as ours."""
        beams = num_beams if method == "beam" else 1
        with torch.no_grad():
            inputs, attention = self.inputs(batch)
            tokens = self.llm.generate(
                inputs_embeds=inputs, attention_mask=attention, max_new_tokens=max_new_tokens,
                min_new_tokens=0, do_sample=False, num_beams=beams, length_penalty=1.0,
                early_stopping="never" if beams > 1 else False, eos_token_id=self.eos_id,
                pad_token_id=self.eos_id, top_k=None, top_p=None, temperature=None)
        out = np.full((len(tokens), max_new_tokens), self.eos_id, np.int64)
        out[:, :tokens.shape[1]] = tokens.numpy()
        return out


def sentence_embeddings(model: transformers.BertModel, tokenizer, texts: Sequence[str], *,
                        max_length: int, pooling: str, normalize: bool, batch_size: int = 64
                        ) -> np.ndarray:
    """[N, D] embeddings the sentence-transformers way: texts sorted by length, batches padded
    to their longest, BertModel, CLS or mean pooling, L2 normalization."""
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    ids = [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]
    order = np.argsort([-len(row) for row in ids], kind="stable")
    out = np.empty((len(ids), model.config.hidden_size), np.float32)
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            rows = order[start:start + batch_size]
            longest = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), longest), model.config.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for j, i in enumerate(rows):
                batch[j, :len(ids[i])] = torch.tensor(ids[i])
                mask[j, :len(ids[i])] = 1
            hidden = model(input_ids=batch, attention_mask=mask).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                weights = mask[..., None].float()
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            if normalize:
                pooled = nn.functional.normalize(pooled, dim=-1)
            out[rows] = pooled.numpy()
    return out
