"""Writes suites/data/arithmetic.jsonl: small-number addition and subtraction
as multiple choice (the true result and three near misses). Deterministic, so
the file and its hash never change unless this script does.

    python suites/make_arithmetic.py
"""

import json
import random
from pathlib import Path


def items(n: int, seed: int = 1234):
    rng = random.Random(seed)
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


if __name__ == "__main__":
    path = Path(__file__).parent / "data" / "arithmetic.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items(100)))
    print(f"wrote {path}")
