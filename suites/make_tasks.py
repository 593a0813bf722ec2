"""Writes the default suite's multiple-choice data into suites/data/, one
JSONL file per task, each line {"context", "choices", "gold"}:

- arithmetic: small-number addition and subtraction (the true result and
  three near misses);
- capitals: world-knowledge cloze, "The capital of France is" + 4 capitals;
- antonyms: word relations, "The opposite of hot is" + 4 words;
- agreement: grammar, subject-verb agreement across a prepositional phrase
  whose noun has the other number ("The keys to the cabinet" + is / are).

Word lists are written by the qbench team; items are drawn from them with a
fixed seed, so the files and their hashes change only when this script does.

    python suites/make_tasks.py
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "the Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Ghana": "Accra",
    "Senegal": "Dakar", "Algeria": "Algiers", "Tunisia": "Tunis", "South Korea": "Seoul", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Nepal": "Kathmandu",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "the Philippines": "Manila",
    "Malaysia": "Kuala Lumpur", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem",
    "Jordan": "Amman", "Lebanon": "Beirut", "Syria": "Damascus", "Afghanistan": "Kabul", "Australia": "Canberra",
    "New Zealand": "Wellington", "Canada": "Ottawa", "the United States": "Washington", "Mexico": "Mexico City",
    "Cuba": "Havana", "Argentina": "Buenos Aires", "Brazil": "Brasilia", "Chile": "Santiago", "Peru": "Lima",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Paraguay": "Asuncion", "Bolivia": "La Paz", "Mongolia": "Ulaanbaatar", "Kazakhstan": "Astana",
    "Uzbekistan": "Tashkent", "Georgia": "Tbilisi", "Armenia": "Yerevan", "Azerbaijan": "Baku",
    "Belarus": "Minsk", "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn", "Slovakia": "Bratislava",
    "Slovenia": "Ljubljana", "Albania": "Tirana", "North Macedonia": "Skopje", "Cyprus": "Nicosia",
    "Malta": "Valletta", "Luxembourg": "Luxembourg", "Qatar": "Doha", "Kuwait": "Kuwait City", "Oman": "Muscat",
    "Yemen": "Sanaa", "Sudan": "Khartoum", "Libya": "Tripoli", "Tanzania": "Dodoma", "Uganda": "Kampala",
    "Zimbabwe": "Harare", "Zambia": "Lusaka", "Angola": "Luanda", "Mozambique": "Maputo", "Sri Lanka": "Colombo",
}

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("open", "closed"), ("happy", "sad"),
    ("light", "dark"), ("early", "late"), ("rich", "poor"), ("strong", "weak"), ("young", "old"), ("hard", "soft"),
    ("wet", "dry"), ("full", "empty"), ("loud", "quiet"), ("high", "low"), ("thick", "thin"), ("wide", "narrow"),
    ("heavy", "light"), ("long", "short"), ("clean", "dirty"), ("cheap", "expensive"), ("true", "false"),
    ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("give", "take"), ("begin", "end"), ("arrive", "leave"),
    ("remember", "forget"), ("accept", "refuse"), ("increase", "decrease"), ("inside", "outside"),
    ("above", "below"), ("before", "after"), ("always", "never"), ("first", "last"), ("day", "night"),
    ("north", "south"), ("east", "west"), ("left", "right"), ("friend", "enemy"), ("question", "answer"),
    ("war", "peace"), ("love", "hate"), ("good", "bad"), ("right", "wrong"), ("safe", "dangerous"),
    ("easy", "difficult"), ("sweet", "sour"), ("deep", "shallow"), ("near", "far"), ("brave", "cowardly"),
    ("polite", "rude"), ("kind", "cruel"), ("private", "public"), ("simple", "complex"), ("ancient", "modern"),
    ("major", "minor"), ("maximum", "minimum"), ("positive", "negative"), ("visible", "invisible"),
    ("possible", "impossible"), ("legal", "illegal"), ("alive", "dead"), ("asleep", "awake"), ("guilty", "innocent"),
    ("wild", "tame"), ("tight", "loose"), ("sharp", "blunt"), ("smooth", "rough"), ("noisy", "silent"),
    ("import", "export"), ("input", "output"), ("entrance", "exit"), ("success", "failure"), ("profit", "loss"),
    ("attack", "defend"), ("borrow", "lend"), ("catch", "throw"), ("laugh", "cry"), ("sink", "float"),
    ("freeze", "melt"), ("whisper", "shout"), ("forward", "backward"), ("internal", "external"),
    ("temporary", "permanent"), ("optional", "mandatory"), ("plural", "singular"), ("odd", "even"),
    ("male", "female"), ("question", "reply"), ("victory", "defeat"), ("summer", "winter"), ("morning", "evening"),
    ("sunrise", "sunset"), ("ceiling", "floor"), ("top", "bottom"), ("front", "back"), ("start", "finish"),
]

# (singular, plural) subjects and attractor nouns for agreement items.
NOUNS = [
    ("key", "keys"), ("book", "books"), ("dog", "dogs"), ("teacher", "teachers"), ("car", "cars"),
    ("picture", "pictures"), ("letter", "letters"), ("student", "students"), ("box", "boxes"), ("child", "children"),
    ("window", "windows"), ("house", "houses"), ("song", "songs"), ("bird", "birds"), ("doctor", "doctors"),
    ("report", "reports"), ("bottle", "bottles"), ("tree", "trees"), ("road", "roads"), ("player", "players"),
]
PREPOSITIONS = ["near", "behind", "next to", "beside", "under", "by", "with", "from"]
VERBS = [(" is", " are"), (" was", " were"), (" has", " have")]


def arithmetic(rng: random.Random, n: int):
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        answer = a + b if op == "+" else a - b
        wrong = set()
        while len(wrong) < 3:
            candidate = answer + rng.choice([-3, -2, -1, 1, 2, 3, 10])
            if candidate >= 0 and candidate != answer:
                wrong.add(candidate)
        choices = [answer, *sorted(wrong)]
        rng.shuffle(choices)
        yield {"context": f"Question: What is {a} {op} {b}?\nAnswer:", "choices": [f" {c}" for c in choices],
               "gold": choices.index(answer)}


def _four_way(rng: random.Random, context: str, answer: str, pool: list[str]):
    wrong = rng.sample(sorted(set(pool) - {answer}), 3)
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {"context": context, "choices": [f" {c}" for c in choices], "gold": choices.index(answer)}


def capitals(rng: random.Random):
    pool = list(CAPITALS.values())
    for country, capital in CAPITALS.items():
        yield _four_way(rng, f"The capital of {country} is", capital, pool)


def antonyms(rng: random.Random):
    pool = [w for pair in ANTONYMS for w in pair]
    for word, opposite in ANTONYMS:
        # Never offer another opposite of the word ("light": dark, heavy).
        partners = {w for pair in ANTONYMS if word in pair for w in pair}
        yield _four_way(rng, f"The opposite of {word} is", opposite, [w for w in pool if w not in partners])


def agreement(rng: random.Random, n: int):
    for _ in range(n):
        subject, attractor = rng.sample(NOUNS, 2)
        plural = rng.random() < 0.5
        # The attractor has the other number: the nearest noun is a trap.
        head = subject[1] if plural else subject[0]
        trap = attractor[0] if plural else attractor[1]
        singular_verb, plural_verb = rng.choice(VERBS)
        yield {"context": f"The {head} {rng.choice(PREPOSITIONS)} the {trap}",
               "choices": [singular_verb, plural_verb], "gold": int(plural)}


TASKS = {
    "arithmetic": lambda: arithmetic(random.Random(1234), 100),
    "capitals": lambda: capitals(random.Random(7)),
    "antonyms": lambda: antonyms(random.Random(11)),
    "agreement": lambda: agreement(random.Random(13), 120),
}


def lm_eval_capitals_docs(n: int = 40):
    """The first ``n`` capitals items as raw documents for the lm-eval format
    example (suites/lm_eval/): the same questions, choices and answers."""
    countries = list(CAPITALS)
    for country, item in zip(countries[:n], capitals(random.Random(7))):
        yield {"country": country, "options": [c.strip() for c in item["choices"]], "answer": item["gold"]}


def lm_eval_arithmetic_docs(op: str, n: int = 200, seed: int = 11):
    """Documents for lm-eval's own ``arithmetic_2da`` / ``arithmetic_2ds``
    tasks, in the fields and raw prompt shape of their dataset
    (EleutherAI/arithmetic: two-digit operands, "Q: What is 48 plus 76?",
    a blank line, "A:", and the answer with a leading space), drawn here with
    a fixed seed: the hub's files are not reachable offline."""
    rng = random.Random(seed)
    word, fn = {"plus": ("plus", lambda a, b: a + b), "minus": ("minus", lambda a, b: a - b)}[op]
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        yield {"context": f"Q: What is {a} {word} {b}?\n\nA:", "completion": f" {fn(a, b)}"}


def _write(path: Path, rows) -> None:
    rows = list(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {path} ({len(rows)} items)")


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, make in TASKS.items():
        _write(here / "data" / f"{name}.jsonl", make())
    _write(here / "lm_eval" / "capitals_docs.jsonl", lm_eval_capitals_docs())
    _write(here / "lm_eval" / "two_digit_addition.jsonl", lm_eval_arithmetic_docs("plus"))
    _write(here / "lm_eval" / "two_digit_subtraction.jsonl", lm_eval_arithmetic_docs("minus", seed=12))
