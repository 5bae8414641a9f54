"""Each checkpoint's own chat template: the same prompt text and ids as transformers'
apply_chat_template, the right end-of-turn token, and training on Llama 2, Llama 3 and Qwen2 layouts."""

import json
import os
import string

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from configs import lamp3
from plug_jax import llm as llm_lib
from plug_jax import train
from plug_jax.models import assets
from plug_jax.models.chat import ChatTemplate
from plug_jax.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SENTENCES = [
        "What is the capital of France? Paris is the capital of France.",
        "Rate this review from 1 to 5: a pleasant album with a few strong songs.",
        "You are a helpful assistant. Answer the user's question briefly.\n\nSure, here it is.",
        "The quick brown fox jumps over the lazy dog 12345 times.",
]
QUESTIONS = ["What is the capital of France?", "Rate this: a pleasant album, 4 stars.",
             "Two\nlines"]

# Our own templates, each rendering its family's documented prompt layout.
LLAMA2_TEMPLATE = (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set system = none %}{% set turns = messages %}"
        "{% endif %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system is not none %}"
        "{% set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set text = message['content'] %}{% endif %}"
        "{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
        "{% endfor %}")
LLAMA3_TEMPLATE = (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}")
QWEN2_TEMPLATE = (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Llama 3's pre-tokenizer split (tiktoken's cl100k pattern): newline runs stay one piece.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_bpe(special, split=None):
    tokenizer = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tokenizer.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(
            vocab_size=360, special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


def _sentencepiece_bpe(special):
    """Llama 2's layout: BPE over "▁"-joined words, a "▁" before the text's first word."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(
            vocab_size=360, special_tokens=special,
            initial_alphabet=list(string.printable.strip()) + ["▁"]))
    return tokenizer


def _adds_bos(tokenizer, bos):
    bos_id = tokenizer.token_to_id(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tokenizer


FAMILIES = {
        "llama2": dict(
                tokenizer=lambda: _adds_bos(_sentencepiece_bpe(["<unk>", "<s>", "</s>"]), "<s>"),
                special=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
                template=LLAMA2_TEMPLATE, model_config=transformers.LlamaConfig, end_of_turn="</s>",
                template_in_tokenizer_config=True),
        "llama3": dict(
                tokenizer=lambda: _adds_bos(_byte_level_bpe(
                        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eot_id|>"], LLAMA3_SPLIT), "<|begin_of_text|>"),
                special=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
                template=LLAMA3_TEMPLATE, model_config=transformers.LlamaConfig,
                end_of_turn="<|eot_id|>", generation_eos=["<|end_of_text|>", "<|eot_id|>"]),
        "qwen2": dict(
                tokenizer=lambda: _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                special=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                template=QWEN2_TEMPLATE, model_config=transformers.Qwen2Config,
                end_of_turn="<|im_end|>"),
}


def _write_checkpoint(family: str, directory):
    spec = FAMILIES[family]
    raw = spec["tokenizer"]()
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=raw, chat_template=spec["template"], **spec["special"])
    hf_tokenizer.save_pretrained(directory)
    if spec.get("template_in_tokenizer_config"):  # where older checkpoints keep it
        (directory / "chat_template.jinja").unlink()
        config_file = directory / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                           "chat_template": spec["template"]}))
    token_id = raw.token_to_id
    config = spec["model_config"](
            vocab_size=raw.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
            bos_token_id=token_id(spec["special"].get("bos_token", "<|endoftext|>")),
            eos_token_id=token_id(spec["special"]["eos_token"]))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if "generation_eos" in spec:
        model.generation_config.eos_token_id = [token_id(t) for t in spec["generation_eos"]]
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _chat(directory):
    tokenizer = Tokenizer.from_tokenizer_json(directory / "tokenizer.json")
    return ChatTemplate.from_hf_dir(directory, tokenizer)


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    return family, _write_checkpoint(family, tmp_path_factory.mktemp(family))


def test_prompt_and_ids_match_apply_chat_template(checkpoint):
    family, directory = checkpoint
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    chat = _chat(directory)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat.prompt(question) == text
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]
        ids = chat.prompt_ids(question)
        assert ids == expected, (family, question)
        assert ids[:len(chat.header_ids)] == chat.header_ids
        assert chat.tokenizer.decode(ids[len(chat.header_ids):]).strip().startswith(question.split()[0])
        if chat.bos_id is not None and "{{ bos_token" in FAMILIES[family]["template"]:
            assert ids.count(chat.bos_id) == 1 and ids[0] == chat.bos_id  # not doubled
    assert chat.end_of_turn_id == hf_tokenizer.convert_tokens_to_ids(FAMILIES[family]["end_of_turn"])
    print(f"{family}: header {len(chat.header_ids)} ids, end of turn "
          f"{FAMILIES[family]['end_of_turn']} = {chat.end_of_turn_id}")


def test_truncation_keeps_the_end_of_turn_and_generation_prompt(checkpoint):
    _, directory = checkpoint
    chat = _chat(directory)
    full, short = chat.body_ids(QUESTIONS[1], 1 << 30), chat.body_ids(QUESTIONS[1], 2)
    kept_tail = len(short) - 2
    assert len(short) < len(full) and short[:2] == full[:2] and short[2:] == full[-kept_tail:]


def test_training_runs_on_each_family(checkpoint, tmp_path):
    family, directory = checkpoint
    config = lamp3.get_config("tiny")
    config.llm.path = str(directory)
    config.optim.max_steps = 2
    config.data.max_eval_examples = 2
    config.data.eval_splits = ("dev",)
    result = train.run(config, tmp_path, baselines=())
    lm = result.experiment.llm
    assert lm.eos_id == lm.tokenizer.token_to_id(FAMILIES[family]["end_of_turn"])
    assert len(result.losses) == 2 and np.all(np.isfinite(result.losses)), result.losses
    assert set(result.metrics["pplug"]["dev"]) == {"mae", "rmse"}
    assert np.isfinite(result.metrics["pplug"]["dev"]["mae"])


def test_a_base_model_without_a_template_gets_a_plain_prompt(tmp_path):
    directory = _write_checkpoint("llama3", tmp_path)
    config_file = directory / "tokenizer_config.json"
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    lm, _ = llm_lib.load_llm(str(directory))
    bos, eos = lm.tokenizer.token_to_id("<|begin_of_text|>"), lm.tokenizer.token_to_id("<|end_of_text|>")
    assert lm.chat.header_ids == [bos] and lm.insert_at == 1
    assert lm.chat.prompt_ids("Hello there") == [bos] + lm.tokenizer.encode("Hello there")
    assert lm.eos_id == eos


def test_smollm2_gguf_template_matches_transformers():
    path = assets.smollm2_gguf()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = Tokenizer.from_gguf(path)
    chat = ChatTemplate.from_gguf(path, tokenizer)
    for system in (None, "You answer in one word."):
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": QUESTIONS[0]})
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat.render(messages) == expected
    default_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    assert chat.prompt(QUESTIONS[0]).startswith(default_system)
    assert chat.prompt_ids(QUESTIONS[0]) == tokenizer.encode(chat.prompt(QUESTIONS[0]))
    assert chat.end_of_turn_id == tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.decode(chat.header_ids, skip_special=False).endswith("<|im_start|>user\n")
