"""Synthetic LaMP data: each user has a hidden preference that only their history reveals.

The project's default data: personalization is measurable with no download, and the mapping from
history to answer is plain enough to learn from sentence embeddings in a few hundred steps. Every
task uses the official prompt template and profile field names, so `lamp.load_split` reads the
written files like the real benchmark.

Per task, the hidden preference and where the history shows it:

- LaMP_1: a research topic. Question titles are generic ("A Scalable Framework for Fast
  Inference"); of the two references, one is from the user's topic and is the answer. The topic
  shows only in the abstracts of the user's past papers.
- LaMP_2: a favourite tag. Each description mentions three tags' cues, always including the
  favourite, which is the answer. The favourite is the one tag cued in every past description.
- LaMP_3: a rating bias b in {-2..2}. A review's text has a visible sentiment s in {2, 3, 4}; the
  score is clip(s + b, 1, 5), so b carries most of the variance. Past reviews carry the score and
  end with the user's habitual remark about how they rate ("I am very generous with my stars.");
  the review to score does not.
- LaMP_4, LaMP_5, LaMP_7: a personal style, a fixed prefix and/or suffix ("Breaking News: {}",
  "{}: A Simple Baseline", "omg {} lol") wrapped around the headline, title or paraphrase. Past
  titles / tweets carry it; the article, abstract or tweet to rewrite does not.

Each user has a timeline of records, oldest first. A known user's `examples_per_user` train
questions and one dev question (the latest record) each have all earlier records as their
profile; a new user (the last `new_user_fraction` of users) has one dev_new question. Every 12th
user starts with an empty history.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from plug_jax.data import lamp

SPLITS = ("train", "dev", "dev_new")
EMPTY_HISTORY_EVERY = 12  # users 11, 23, 35, ... have no history before their first question


@dataclasses.dataclass(frozen=True)
class SyntheticUser:
    """A synthetic user and the preference their history reveals."""

    user_id: str
    preference: str  # LaMP_1 topic, LaMP_2 tag, LaMP_3 bias ("-2".."+2"), else a style "x {} y"
    initial_history: int  # records before the user's first question
    is_new: bool  # in dev_new only, never in train


@dataclasses.dataclass(frozen=True)
class _Record:
    """One item of a user's timeline, seen as a question and, later, as a profile item."""

    input_fields: dict[str, str]  # fills the task's input template
    output: str
    profile_fields: dict[str, str]  # the profile item, less id and date


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------------
# LaMP_1: which reference relates, by research topic.

TOPICS: dict[str, tuple[str, str, str]] = {  # topic -> (subject, method, data) phrases
    "graph learning": ("graph neural networks", "node classification", "citation graphs"),
    "speech": ("speech recognition", "acoustic modeling", "spoken audio"),
    "vision": ("image segmentation", "object detection", "street scenes"),
    "biology": ("protein structure", "gene expression", "single cell data"),
    "robotics": ("robot navigation", "motion planning", "mobile robots"),
    "security": ("malware detection", "intrusion detection", "network traffic"),
    "databases": ("query optimization", "index structures", "relational databases"),
    "translation": ("machine translation", "multilingual models", "parallel corpora"),
    "reinforcement learning": ("policy optimization", "reward shaping", "game environments"),
    "quantum computing": ("quantum circuits", "error correction", "quantum hardware"),
}
_TITLE_ADJECTIVES = ("A Scalable", "A Robust", "A Simple", "A Unified", "An Efficient",
                     "An Adaptive", "A Principled")
_TITLE_NOUNS = ("Framework", "Approach", "Method", "Model", "Algorithm")
_TITLE_GOALS = ("Efficient Learning", "Better Generalization", "Fast Inference",
                "Reliable Prediction", "Low-Resource Settings", "Large-Scale Training")
_ABSTRACTS = (
    "We study {0} and propose a new method for {1}. Experiments on {2} show clear gains.",
    "This paper revisits {1} for {0}. We evaluate on {2} and report strong results.",
    "We present a model for {0} that improves {1}, tested on {2}.",
)
_REFERENCES = ("{0} with Deep Networks", "Improving {1} on {2}", "A Survey of {0}",
               "{1} for {0}", "Benchmarking {0} on {2}")


def _title_case(text: str) -> str:
    return " ".join(word[:1].upper() + word[1:] for word in text.split())


def _reference(rng: np.random.Generator, topic: str) -> str:
    return _pick(rng, _REFERENCES).format(*(_title_case(p) for p in TOPICS[topic]))


def _lamp1_record(rng: np.random.Generator, topic: str) -> _Record:
    title = (f"{_pick(rng, _TITLE_ADJECTIVES)} {_pick(rng, _TITLE_NOUNS)} for "
             f"{_pick(rng, _TITLE_GOALS)}")
    abstract = _pick(rng, _ABSTRACTS).format(*TOPICS[topic])
    other = _pick(rng, [t for t in TOPICS if t != topic])
    related, unrelated = _reference(rng, topic), _reference(rng, other)
    first = rng.random() < 0.5
    refs = (related, unrelated) if first else (unrelated, related)
    return _Record(input_fields={"title": title, "ref1": refs[0], "ref2": refs[1]},
                   output="[1]" if first else "[2]",
                   profile_fields={"title": title, "abstract": abstract})


# --------------------------------------------------------------------------------------------
# LaMP_2: the favourite tag among those a description cues.

TAG_CUES: dict[str, tuple[str, ...]] = {
    "sci-fi": ("a starship crew exploring distant galaxies", "alien invaders with laser guns"),
    "based on a book": ("an adaptation of a bestselling novel", "a story taken from a famous book"),
    "comedy": ("hilarious slapstick gags", "a goofy family full of jokes"),
    "action": ("explosive car chases", "nonstop shootouts and stunts"),
    "twist ending": ("a shocking final reveal", "an ending nobody sees coming"),
    "dystopia": ("a grim totalitarian future", "survivors under a cruel regime"),
    "dark comedy": ("morbid jokes about death", "a funeral that goes hilariously wrong"),
    "classic": ("a timeless black-and-white masterpiece", "a golden-age Hollywood legend"),
    "psychology": ("the troubled mind of a patient", "a therapist unraveling obsessions"),
    "fantasy": ("wizards and dragons", "an enchanted kingdom of elves"),
    "romance": ("two lovers separated by fate", "a passionate love affair"),
    "thought-provoking": ("deep questions about existence", "ideas that linger long after"),
    "social commentary": ("a sharp critique of class and inequality", "a satire of modern society"),
    "violence": ("brutal bloody fights", "graphic gang warfare"),
    "true story": ("real events from history", "the true life of a famous athlete"),
}
assert tuple(TAG_CUES) == lamp.LAMP2_TAGS


def tags_in_description(description: str) -> list[str]:
    """The tags whose cues a synthetic LaMP_2 description mentions, in order of mention."""
    found = [(description.find(cue), tag) for tag, cues in TAG_CUES.items() for cue in cues
             if cue in description]
    return [tag for _, tag in sorted(found)]


def _lamp2_record(rng: np.random.Generator, favourite: str) -> _Record:
    others = rng.choice([t for t in TAG_CUES if t != favourite], size=2, replace=False)
    tags = [favourite, *map(str, others)]
    rng.shuffle(tags)
    cues = [_pick(rng, TAG_CUES[tag]) for tag in tags]
    description = f"A film about {cues[0]}, {cues[1]} and {cues[2]}."
    return _Record(input_fields={"description": description}, output=favourite,
                   profile_fields={"description": description, "tag": favourite})


# --------------------------------------------------------------------------------------------
# LaMP_3: score = clip(visible sentiment + the user's bias).

_GENRES = ("jazz", "folk", "hip hop", "country", "punk", "soul", "classical", "reggae",
           "techno", "blues", "metal", "pop")
_REVIEW_OPENERS = ("I picked up this {} album last month.", "This {} record arrived on time.",
                   "I bought the new {} EP after hearing one song.", "A friend lent me this {} CD.")
SENTIMENT_SENTENCES: dict[int, tuple[str, ...]] = {
    2: ("Sadly most songs felt flat and dull.", "The vocals are weak and the mix is muddy.",
        "Disappointing, I skipped half of the tracks.",
        "Not very good, the melodies are forgettable."),
    3: ("It is okay, a few decent songs and some filler.", "Average overall, nothing special.",
        "Some tracks work, others are just fine.", "A mixed bag, neither good nor bad."),
    4: ("Really good songs with catchy hooks.", "Great production and strong vocals throughout.",
        "I enjoyed it a lot, the melodies stick.", "A very solid album, well worth a listen."),
}
RATING_VOICES: dict[int, tuple[str, ...]] = {  # bias -> the user's remarks on how they rate
    -2: ("I am a harsh critic and rarely hand out good scores.",
         "As always, my standards are very high.",
         "Few albums ever live up to my expectations."),
    -1: ("I tend to be a little stingy with stars.",
         "I usually find something to complain about.",
         "I am somewhat hard to please."),
    0: ("I try to rate every album fairly.",
        "My ratings are balanced and honest.",
        "I judge each record on its merits alone."),
    1: ("I am usually pleased with what I hear.",
        "I like to be a bit generous with scores.",
        "I tend to enjoy most records."),
    2: ("I love almost everything I listen to!",
        "I am very generous with my stars.",
        "Music always makes me happy, so I rate high."),
}


def review_sentiment(review: str) -> int:
    """The visible sentiment (2, 3 or 4) of a synthetic LaMP_3 review."""
    for sentiment, sentences in SENTIMENT_SENTENCES.items():
        if any(sentence in review for sentence in sentences):
            return sentiment
    raise ValueError(f"not a synthetic review: {review!r}")


def _lamp3_record(rng: np.random.Generator, preference: str) -> _Record:
    bias = int(preference)
    sentiment = int(rng.choice(list(SENTIMENT_SENTENCES)))
    review = (f"{_pick(rng, _REVIEW_OPENERS).format(_pick(rng, _GENRES))} "
              f"{_pick(rng, SENTIMENT_SENTENCES[sentiment])}")
    score = str(min(max(sentiment + bias, 1), 5))
    return _Record(input_fields={"review": review}, output=score,
                   profile_fields={"text": f"{review} {_pick(rng, RATING_VOICES[bias])}",
                                   "score": score})


# --------------------------------------------------------------------------------------------
# LaMP_4, LaMP_5, LaMP_7: a personal style around the gold text.

STYLES: dict[str, tuple[str, ...]] = {
    "LaMP_4": ("Breaking News: {}", "Just In: {}", "Exclusive Report: {}", "Watch Live: {}",
               "{}, Sources Say", "{} - Here Is Why", "{} (Photos Inside)", "{} - Full Story"),
    "LaMP_5": ("Towards {}", "Rethinking {}", "Fast and Simple {}", "Learning {}",
               "{}: A Simple Baseline", "{}: A Survey", "{}: Theory and Practice", "{} Revisited"),
    "LaMP_7": ("omg {} lol", "ngl {} tbh", "honestly {} just saying", "ugh {} smh",
               "{} #blessed #grateful", "yo {} fr fr", "{} #nofilter", "lowkey {} haha"),
}

_SUBJECTS = (  # (in an article, in a headline, plural)
    ("The city council", "City Council", False), ("Local teachers", "Local Teachers", True),
    ("A tech startup", "Tech Startup", False), ("State regulators", "State Regulators", True),
    ("Hospital workers", "Hospital Workers", True), ("The mayor", "Mayor", False),
    ("Farmers", "Farmers", True), ("The school board", "School Board", False))
_VERBS = (("approved", "Approves", "Approve"), ("rejected", "Rejects", "Reject"),
          ("announced", "Announces", "Announce"), ("delayed", "Delays", "Delay"),
          ("backed", "Backs", "Back"), ("debated", "Debates", "Debate"))
_OBJECTS = (("a new park budget", "New Park Budget"),
            ("a plan to expand bus service", "Plan To Expand Bus Service"),
            ("higher school funding", "Higher School Funding"),
            ("a ban on plastic bags", "Ban On Plastic Bags"),
            ("a downtown housing project", "Downtown Housing Project"),
            ("free summer meals for children", "Free Summer Meals For Children"),
            ("a new recycling program", "New Recycling Program"),
            ("longer library hours", "Longer Library Hours"))
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
_SOURCES = ("officials said", "according to a statement", "a spokesperson confirmed")
_NEWS_FILLERS = ("The decision follows months of public debate.",
                 "Critics say the move comes too late.", "More details are expected next week.",
                 "Residents had asked for the change for years.")

_PAPER_TASKS = (
    ("graph clustering", "Graph Clustering"), ("anomaly detection", "Anomaly Detection"),
    ("text summarization", "Text Summarization"), ("image denoising", "Image Denoising"),
    ("route planning", "Route Planning"), ("sentiment analysis", "Sentiment Analysis"),
    ("time series forecasting", "Time Series Forecasting"),
    ("question answering", "Question Answering"))
_PAPER_DOMAINS = (("social networks", "Social Networks"), ("medical records", "Medical Records"),
                  ("satellite images", "Satellite Images"), ("online news", "Online News"),
                  ("smart grids", "Smart Grids"), ("sensor streams", "Sensor Streams"))
_PAPER_DETAILS = ("Our approach is fast and easy to train.",
                  "Experiments on three benchmarks show consistent gains.",
                  "We also release code and data.", "It needs no labeled examples.")

_TWEET_EVENTS = ("finished a long run", "burned the toast again", "watching the game with friends",
                 "stuck in traffic on the highway", "trying a new pasta recipe",
                 "finally done with exams", "my cat knocked over the plant",
                 "coffee first then emails", "the train is late again", "rain all day long",
                 "found a great new podcast", "cleaning the whole apartment")
_TWEET_TIMES = ("this morning", "tonight", "today", "right now", "on a monday")


def _lamp4_record(rng: np.random.Generator, style: str) -> _Record:
    subject, subject_title, plural = _pick(rng, _SUBJECTS)
    past, verb_singular, verb_plural = _pick(rng, _VERBS)
    obj, obj_title = _pick(rng, _OBJECTS)
    article = (f"{subject} {past} {obj} on {_pick(rng, _DAYS)}, {_pick(rng, _SOURCES)}. "
               f"{_pick(rng, _NEWS_FILLERS)}")
    headline = f"{subject_title} {verb_plural if plural else verb_singular} {obj_title}"
    title = style.format(headline)
    return _Record(input_fields={"article": article}, output=title,
                   profile_fields={"title": title, "text": article})


def _lamp5_record(rng: np.random.Generator, style: str) -> _Record:
    task, task_title = _pick(rng, _PAPER_TASKS)
    domain, domain_title = _pick(rng, _PAPER_DOMAINS)
    abstract = f"We propose a method for {task} in {domain}. {_pick(rng, _PAPER_DETAILS)}"
    title = style.format(f"{task_title} for {domain_title}")
    return _Record(input_fields={"abstract": abstract}, output=title,
                   profile_fields={"title": title, "abstract": abstract})


def _lamp7_record(rng: np.random.Generator, style: str) -> _Record:
    tweet = f"{_pick(rng, _TWEET_EVENTS)} {_pick(rng, _TWEET_TIMES)}"
    paraphrase = style.format(tweet)
    return _Record(input_fields={"tweet": tweet[:1].upper() + tweet[1:] + "."}, output=paraphrase,
                   profile_fields={"text": paraphrase})


# --------------------------------------------------------------------------------------------
# Users and splits.

_PREFERENCES: dict[str, tuple[str, ...]] = {
    "LaMP_1": tuple(TOPICS),
    "LaMP_2": lamp.LAMP2_TAGS,
    "LaMP_3": ("-2", "-1", "0", "+1", "+2"),
    **STYLES,
}
_RECORD_MAKERS: dict[str, Callable[[np.random.Generator, str], _Record]] = {
    "LaMP_1": _lamp1_record, "LaMP_2": _lamp2_record, "LaMP_3": _lamp3_record,
    "LaMP_4": _lamp4_record, "LaMP_5": _lamp5_record, "LaMP_7": _lamp7_record,
}


def _user_rng(task: lamp.Task, seed: int, index: int, stream: int) -> np.random.Generator:
    # Streams per user (0: traits, 1: records), so a user does not depend on the number of users.
    return np.random.default_rng([seed, int(task.name.split("_")[1]), index, stream])


def _num_new_users(num_users: int, new_user_fraction: float) -> int:
    if num_users < 2 or new_user_fraction <= 0:
        return 0
    return min(num_users - 1, max(1, round(num_users * new_user_fraction)))


def generate_users(task_name: str, num_users: int, profile_size: int = 8, seed: int = 0,
                   new_user_fraction: float = 0.2) -> list[SyntheticUser]:
    """The users `generate` makes with the same arguments, with their hidden preferences."""
    task = lamp.get_task(task_name)
    first_new = num_users - _num_new_users(num_users, new_user_fraction)
    low = max(1, profile_size // 2)
    high = max(low, profile_size + profile_size // 2)
    users = []
    for index in range(num_users):
        rng = _user_rng(task, seed, index, stream=0)
        preference = _pick(rng, _PREFERENCES[task.name])
        size = int(rng.integers(low, high + 1))
        if index % EMPTY_HISTORY_EVERY == EMPTY_HISTORY_EVERY - 1 or profile_size <= 0:
            size = 0
        users.append(SyntheticUser(user_id=f"u{index:04d}", preference=preference,
                                   initial_history=size, is_new=index >= first_new))
    return users


def _timeline(task: lamp.Task, user: SyntheticUser, num_records: int,
              rng: np.random.Generator) -> tuple[list[_Record], list[str]]:
    records = [_RECORD_MAKERS[task.name](rng, user.preference) for _ in range(num_records)]
    day = datetime.date(2020, 1, 1) + datetime.timedelta(days=int(rng.integers(365)))
    dates = []
    for _ in records:
        day += datetime.timedelta(days=int(rng.integers(1, 30)))
        dates.append(day.isoformat())
    return records, dates


def _question(task: lamp.Task, user: SyntheticUser, records: Sequence[_Record],
              dates: Sequence[str], position: int, rng: np.random.Generator) -> dict[str, Any]:
    profile = [{"id": f"{user.user_id}-r{k}", **records[k].profile_fields, "date": dates[k]}
               for k in range(position)]
    rng.shuffle(profile)  # LaMP files do not list profiles in time order; readers sort by date
    return {"id": f"{task.name}-{user.user_id}-{position}", "user_id": user.user_id,
            "input": task.format_input(**records[position].input_fields), "profile": profile}


def generate_files(task_name: str, num_users: int = 64, examples_per_user: int = 6,
                   profile_size: int = 8, seed: int = 0, new_user_fraction: float = 0.2,
                   ) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    """The LaMP JSON of each split: {split: (questions list, outputs object)}."""
    task = lamp.get_task(task_name)
    files = {split: ([], {"task": task.name, "golds": []}) for split in SPLITS}

    def add(split: str, question: dict[str, Any], output: str) -> None:
        files[split][0].append(question)
        files[split][1]["golds"].append({"id": question["id"], "output": output})

    for index, user in enumerate(
            generate_users(task.name, num_users, profile_size, seed, new_user_fraction)):
        rng = _user_rng(task, seed, index, stream=1)
        num_questions = 1 if user.is_new else examples_per_user + 1
        records, dates = _timeline(task, user, user.initial_history + num_questions, rng)
        for position in range(user.initial_history, len(records)):
            split = ("dev_new" if user.is_new else
                     "dev" if position == len(records) - 1 else "train")
            add(split, _question(task, user, records, dates, position, rng),
                records[position].output)
    return files


def generate(task_name: str, num_users: int = 64, examples_per_user: int = 6,
             profile_size: int = 8, seed: int = 0, new_user_fraction: float = 0.2,
             ) -> dict[str, list[lamp.Example]]:
    """Synthetic LaMP examples, deterministic in the arguments.

    Args:
      task_name: "LaMP_1", "LaMP_2", "LaMP_3", "LaMP_4", "LaMP_5" or "LaMP_7".
      num_users: users in all; the last `new_user_fraction` of them only appear in dev_new.
      examples_per_user: train questions per known user (each also has one dev question).
      profile_size: typical history length before a user's first question (drawn per user from
        [profile_size // 2, 1.5 * profile_size]; every 12th user has none). Later questions see
        all earlier records, so histories grow up to profile_size * 1.5 + examples_per_user.
      seed: the random seed.
      new_user_fraction: the share of users held out for dev_new.

    Returns:
      {"train": ..., "dev": each known user's latest question, "dev_new": unseen users}.
    """
    files = generate_files(task_name, num_users, examples_per_user, profile_size, seed,
                           new_user_fraction)
    return {split: lamp.parse_examples(questions, outputs, task_name,
                                       questions_source=f"synthetic {task_name} {split}")[1]
            for split, (questions, outputs) in files.items()}


def write_lamp_dir(out_dir: str | os.PathLike[str], task_name: str, num_users: int = 64,
                   examples_per_user: int = 6, profile_size: int = 8, seed: int = 0,
                   new_user_fraction: float = 0.2) -> Path:
    """Writes `generate`'s data in the LaMP layout ({split}_questions.json, _outputs.json).

    Also writes stats.json (counts, as the real data's) and users.json (each user's hidden
    preference, for analysis only: models must not read it).
    """
    out_dir = epath.Path(out_dir)
    files = generate_files(task_name, num_users, examples_per_user, profile_size, seed,
                           new_user_fraction)
    stats: dict[str, Any] = {"task": lamp.get_task(task_name).name, "num_users": num_users,
                             "examples_per_user": examples_per_user, "profile_size": profile_size,
                             "seed": seed, "new_user_fraction": new_user_fraction}
    for split, (questions, outputs) in files.items():
        lamp.write_json(out_dir / f"{split}_questions.json", questions)
        lamp.write_json(out_dir / f"{split}_outputs.json", outputs)
        sizes = [len(q["profile"]) for q in questions]
        stats[split] = {"questions": len(questions),
                        "users": len({q["user_id"] for q in questions}),
                        "profile_median": float(np.median(sizes)) if sizes else 0.0}
    lamp.write_json(out_dir / "stats.json", stats)
    lamp.write_json(out_dir / "users.json", [
        dataclasses.asdict(user) for user in
        generate_users(task_name, num_users, profile_size, seed, new_user_fraction)])
    return out_dir
