"""The methods a run can be: PPlug, its ablations and the baselines it must beat, by name.

`config.method` names one; `plug_jax.train` trains the plug of a trained method, and
`plug_jax.compare` runs several over seeds. The baselines that need no LLM live in
`plug_jax.baselines`.
"""

from __future__ import annotations

import dataclasses

from plug_jax import errors


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    uses_llm: bool = True
    plug: str | None = None   # None: the frozen LLM alone; "instruction": that token only; "persona"
    retrieval: bool = False   # the user's top BM25 history items written into the prompt
    label_choice: str = ""    # "method@rule": answers chosen by decode.label_choice=rule

    @property
    def trains(self) -> bool:
        return self.plug is not None


METHODS = {method.name: method for method in (
    Method("majority", "the most frequent training label; LaMP-4/5/7: the user's latest output",
           uses_llm=False),
    Method("profile", "from the user's history alone: their most frequent label (LaMP-1/2), "
           "median score (LaMP-3), latest output (LaMP-4/5/7)", uses_llm=False),
    Method("zero_shot", "the frozen LLM alone"),
    Method("bm25", "the frozen LLM with the user's top-k BM25 items in the prompt",
           retrieval=True),
    Method("instruction", "a trained instruction token alone (no history)", plug="instruction"),
    Method("bm25_instruction", "BM25 items in the prompt and a trained instruction token",
           plug="instruction", retrieval=True),
    Method("pplug", "the persona plug", plug="persona"),
    Method("pplug_bm25", "the persona plug and BM25 items in the prompt", plug="persona",
           retrieval=True),
)}


# How a method answers from its label likelihoods: plug_jax.evaluate.choose_labels.
LABEL_CHOICES = ("likeliest", "median", "mean")


def get(name: str) -> Method:
    """A method by name; "pplug@mean" is pplug answering by decode.label_choice "mean" (compare
    evaluates it with the plug that "pplug" trained, under the same seed)."""
    base, _, rule = name.partition("@")
    if base not in METHODS:
        raise errors.ConfigError(f"unknown method {base!r}; known: {', '.join(METHODS)}")
    if not rule:
        return METHODS[base]
    if rule not in LABEL_CHOICES:
        raise errors.ConfigError(
            f"method {name!r}: {rule!r} is not one of {', '.join(LABEL_CHOICES)}")
    if not METHODS[base].uses_llm:
        raise errors.ConfigError(f"method {name!r}: {base} answers without the LLM's label likelihoods")
    return dataclasses.replace(METHODS[base], name=name, label_choice=rule)


def base_name(name: str) -> str:
    """"pplug@mean" -> "pplug": the method whose trained plug "pplug@mean" reuses."""
    return name.partition("@")[0]
