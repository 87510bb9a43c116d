"""The self-distillation prompt set: instruction templates x topics, plus passages of English text
and small functions shipped with Python itself (`pydoc_data`, the standard library's source) for
copy-heavy requests (translate, answer from a passage, quote, edit given code), deduplicated and
checked against evaluation prompts.

Nothing is downloaded. The categories mirror the kinds of requests chat users make (writing,
role-play, reasoning, math, coding, extraction, STEM, humanities) without reusing any evaluation
prompt: `overlapping(prompt, eval_prompts)` rejects a prompt that shares an 8-word run with one.
"""
from __future__ import annotations

import random
import re
from typing import Iterable

TOPICS = {
    "science": "photosynthesis, black holes, plate tectonics, the water cycle, vaccines, DNA replication, "
               "climate change, the immune system, quantum entanglement, antibiotics resistance, volcanoes, "
               "the periodic table, electric circuits, magnetism, ocean currents, the human heart, "
               "renewable energy, nuclear fusion, coral reefs, the solar system, evolution by natural selection, "
               "sound waves, the greenhouse effect, cell division, gravity, rainbows, earthquakes, bacteria, "
               "the nitrogen cycle, batteries, superconductors, tides, the speed of light, enzymes, hurricanes",
    "technology": "cloud computing, machine learning, blockchains, the internet, smartphones, 3D printing, "
                  "electric cars, cybersecurity, open source software, databases, compilers, operating systems, "
                  "search engines, GPS, solar panels, robotics, virtual reality, data compression, encryption, "
                  "wireless charging, self-driving cars, recommendation systems, containers, web browsers",
    "history": "the Roman Empire, the printing press, the Industrial Revolution, the Silk Road, ancient Egypt, "
               "the Renaissance, the French Revolution, the Apollo program, the Ottoman Empire, the Cold War, "
               "the invention of writing, the Maya civilization, the Meiji Restoration, the Hanseatic League, "
               "the age of exploration, the history of medicine, the Byzantine Empire, the abolition of slavery",
    "daily life": "time management, healthy breakfast ideas, learning a new language, saving money, "
                  "starting a vegetable garden, moving to a new city, public speaking, remote work, "
                  "planning a birthday party, adopting a dog, decluttering a home, running a first marathon, "
                  "cooking for one, sleeping better, making friends as an adult, buying a used car, "
                  "preparing for a job interview, reducing screen time, composting, budgeting for a holiday",
    "arts": "impressionist painting, jazz music, film noir, haiku, street photography, ballet, "
            "graphic novels, opera, pottery, stand-up comedy, architecture of cathedrals, origami, "
            "video game design, folk tales, calligraphy, minimalism in design, classical symphonies",
    "business": "a small bakery, a bicycle repair shop, a mobile app startup, a local bookstore, "
                "a coffee subscription service, a dog walking business, a language school, "
                "an online furniture store, a community theatre, a recycling company, a food truck",
    "places": "Iceland, Kyoto, the Sahara desert, the Amazon rainforest, Patagonia, Istanbul, "
              "the Scottish Highlands, Mongolia, New Zealand, Morocco, the Alps, Vietnam, Peru, Norway",
}

TEMPLATES = {
    "explain": ["Explain {t} to a curious twelve-year-old.", "What is {t}, and why does it matter?",
                "Give a clear, detailed explanation of {t}.", "Describe how {t} works, step by step.",
                "What are the most common misconceptions about {t}?", "Summarize the key ideas behind {t}."],
    "list": ["List five interesting facts about {t}.", "What are the pros and cons of {t}?",
             "Give me seven practical tips about {t}.", "Name three important questions about {t} and answer them."],
    "writing": ["Write a short story that involves {t}.", "Write a poem about {t}.",
                "Write a persuasive paragraph about {t}.", "Write a blog post introduction about {t}.",
                "Write a friendly email to a colleague about {t}.", "Write a product description inspired by {t}.",
                "Write a dialogue between two friends discussing {t}."],
    "roleplay": ["Pretend you are a tour guide and describe {t}.", "Act as a teacher and give a short lesson on {t}.",
                 "You are a journalist. Write a news report about {t}.",
                 "Imagine you are an expert on {t}. Answer a beginner's first question."],
    "compare": ["Compare {t} and {u}: how are they similar and different?",
                "Which is more important for the future, {t} or {u}? Argue both sides."],
    "plan": ["Make a one-week plan for learning about {t}.", "Create a business plan outline for {b}.",
             "Suggest a marketing strategy for {b}.", "Plan a five-day trip to {p}."],
}

CODING_TASKS = [
    "reverses a string", "checks whether a number is prime", "merges two sorted lists",
    "counts word frequencies in a text", "finds the longest common prefix of a list of strings",
    "computes the nth Fibonacci number iteratively", "removes duplicates from a list while keeping order",
    "validates an email address with a regular expression", "flattens a nested list",
    "converts Roman numerals to integers", "implements binary search", "rotates a matrix by 90 degrees",
    "parses a CSV line into fields", "computes the median of a list", "checks balanced parentheses",
    "implements a simple LRU cache", "finds all anagrams in a word list", "computes the greatest common divisor",
]
LANGUAGES = ["Python", "JavaScript", "C", "Rust", "Go", "Java"]


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _math_prompts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 90), rng.randint(2, 60), rng.randint(2, 12)
        out.append(rng.choice([
            f"A shop sells pencils at {a} cents each. How much do {b} pencils cost? Show your work.",
            f"A train travels {a} km in {c} hours. What is its average speed? Explain.",
            f"Solve for x: {c}x + {a} = {a + c * b}. Explain each step.",
            f"What is {a} multiplied by {b}, minus {c}? Show the calculation.",
            f"A rectangle is {a} cm long and {b} cm wide. Find its area and perimeter.",
            f"If {c} workers build a wall in {a} days, how long would {c * 2} workers take? Explain.",
            f"Find the sum of all integers from 1 to {a * c}.",
        ]))
    return out


def _passage_prompts(rng: random.Random, n: int) -> list[str]:
    """'Explain / summarise this passage' over Python's own documentation text (pydoc_data)."""
    paragraphs = _paragraphs()
    rng.shuffle(paragraphs)
    asks = ["Summarize the following passage in plain words:\n\n{x}",
            "Explain this documentation excerpt to a beginner programmer:\n\n{x}",
            "Extract the main rules stated in this text as a bullet list:\n\n{x}",
            "Write three quiz questions (with answers) based on this text:\n\n{x}"]
    return [rng.choice(asks).format(x=p) for p in paragraphs[:n]]


COPY_LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
# pure-Python standard-library modules whose small functions serve as code to copy and edit
CODE_MODULES = ["textwrap", "fnmatch", "colorsys", "heapq", "bisect", "statistics", "shlex", "string",
                "difflib", "calendar", "glob", "posixpath", "base64", "html", "ipaddress", "fractions"]


def _paragraphs() -> list[str]:
    """Prose paragraphs of Python's own documentation text (pydoc_data), whitespace-normalised."""
    from pydoc_data.topics import topics

    return [re.sub(r"\s+", " ", p.strip()) for text in topics.values() for p in text.split("\n\n")
            if 200 <= len(p.strip()) <= 900 and p.count(" ") > 30 and not p.strip().startswith(">>>")]


def _functions(max_lines: int = 30) -> list[str]:
    """Source of small pure-Python functions of the standard library (5..max_lines lines)."""
    import importlib
    import inspect

    out = []
    for name in CODE_MODULES:
        module = importlib.import_module(name)
        for _, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ != module.__name__:
                continue
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            if 5 <= src.count("\n") <= max_lines:
                out.append(src.rstrip())
    return out


def _copy_prompts(rng: random.Random, n: int) -> list[str]:
    """Requests whose answers copy much of the prompt: translate, answer from a passage, quote,
    restructure, and edit given code (the kinds where prompt-lookup drafts pay, and where the pseudo
    rows should learn to copy too)."""
    paragraphs, functions = _paragraphs(), _functions()
    rng.shuffle(paragraphs)
    rng.shuffle(functions)
    out = []
    for i in range(n):
        if i % 4 == 3 and functions:
            src = functions[(i // 4) % len(functions)]
            out.append(rng.choice([
                "Add a docstring and comments to this Python function. Return the whole function:\n\n{x}",
                "Rename the variables of this Python function to clearer names and return the full code:\n\n{x}",
                "Add type hints to this Python function and return the complete function:\n\n{x}",
                "Explain what this Python function does, line by line, quoting each line first:\n\n{x}",
            ]).format(x=src))
            continue
        x = paragraphs[i % len(paragraphs)]
        words = re.findall(r"[A-Za-z_]{6,}", x)
        kw = rng.choice(words) if words else "this"
        out.append(rng.choice([
            f"Translate the following passage into {rng.choice(COPY_LANGUAGES)}. Keep the same number of "
            f"sentences.\n\n{x}",
            f"Read the passage and answer the question using the passage's own words.\n\nPassage: {x}\n\n"
            f"Question: what does the passage say about \"{kw}\"?",
            f"Quote the sentence of this text that mentions \"{kw}\", then explain it in one sentence.\n\n{x}",
            f"Rewrite this text as a numbered list, one sentence per item, keeping the wording:\n\n{x}",
            f"Fix any grammar or punctuation problems in this text and return the corrected text in full:\n\n{x}",
        ]))
    return out


def build_prompts(num: int, seed: int = 0) -> list[str]:
    """`num` distinct training prompts (fewer if the generators run dry), shuffled with `seed`."""
    rng = random.Random(seed)
    topics = [t for key, v in TOPICS.items() if key not in ("business", "places") for t in _split(v)]
    business, places = _split(TOPICS["business"]), _split(TOPICS["places"])
    pool: list[str] = []
    for kind, templates in TEMPLATES.items():
        for tpl in templates:
            for t in topics:
                pool.append(tpl.format(t=t, u=rng.choice(topics), b=rng.choice(business), p=rng.choice(places)))
    pool += [f"Write a {lang} function that {task}. Include a short explanation."
             for lang in LANGUAGES for task in CODING_TASKS]
    pool += _math_prompts(rng, max(num // 8, 50))
    pool += _passage_prompts(rng, max(num // 6, 50))
    pool += _copy_prompts(rng, max(num // 4, 50))
    return dedupe(rng.sample(pool, len(pool)))[:num]


def dedupe(prompts: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for p in prompts:
        key = " ".join(_words(p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))}


def overlapping(prompts: Iterable[str], eval_prompts: Iterable[str], n: int = 8) -> list[str]:
    """Training prompts sharing an n-word run (or, if shorter, all their words) with an eval prompt."""
    banned = set().union(*(ngrams(e, n) for e in eval_prompts))
    return [p for p in prompts if ngrams(p, n) & banned]
