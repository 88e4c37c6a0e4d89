"""Offline calibration and training text: real Python source and worked math solutions.

Hugging Face datasets are unreachable offline, so reamkit carries its own deterministic corpora of the two
kinds the REAM calibration mix uses (code and math solutions):

* ``code_documents``: the Python standard library of the running interpreter (real code, PSF licence);
* ``math_documents``: generated worked solutions -- a problem, the steps, and the answer -- all distinct.
"""

from __future__ import annotations

import math
import random
import sysconfig
from pathlib import Path

VERSION = 1          # part of every cache key built from these corpora
HELDOUT_EVERY = 20   # every 20th document is held out for evaluation; the rest may calibrate or train


def calibration_part(docs: list[str]) -> list[str]:
    """The documents calibration and training may use: all but every ``HELDOUT_EVERY``-th."""
    return [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]


def heldout_part(docs: list[str]) -> list[str]:
    """The documents kept for evaluation only (disjoint from :func:`calibration_part`)."""
    return [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]


def code_documents(limit_bytes: int | None = None) -> list[str]:
    """Python source of this interpreter's standard library, in a fixed order (real code, PSF licence)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "dist-packages") or "idle_test" in rel:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 200:
            continue
        docs.append(text)
        total += len(text)
        if limit_bytes and total >= limit_bytes:
            break
    return docs


def math_documents(n: int, seed: int = 0) -> list[str]:
    """Generated worked solutions: each a problem statement and a step-by-step solution ending in the answer.
    All distinct, so that no held-out problem also appears in training."""
    rng = random.Random(seed)
    docs: dict[str, None] = {}          # insertion-ordered set
    while len(docs) < n:
        docs.setdefault(_math_problem(rng), None)
    return list(docs)


_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
_ITEMS = ["apples", "pencils", "books", "marbles", "stickers", "cookies", "coins", "cards", "tickets"]


def _math_problem(rng: random.Random) -> str:
    kind = rng.randrange(10)
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 12)
    who, what = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind == 0:
        total = a * c + b
        return (f"Problem: {who} buys {c} boxes of {what} with {a} {what} in each box, then finds {b} more. "
                f"How many {what} does {who} have?\nSolution: The boxes hold {c} * {a} = {a * c} {what}. "
                f"Adding the {b} found gives {a * c} + {b} = {total}.\nThe answer is {total}.")
    elif kind == 1:
        x = rng.randint(-20, 20)
        rhs = b * x + a
        return (f"Problem: Solve for x: {b}x + {a} = {rhs}.\nSolution: Subtract {a} from both sides: "
                f"{b}x = {rhs} - {a} = {rhs - a}. Divide both sides by {b}: x = {rhs - a} / {b} = {x}.\n"
                f"Check: {b} * {x} + {a} = {b * x + a}.\nThe answer is x = {x}.")
    elif kind == 2:
        g = math.gcd(a * c, b * c)
        return (f"Problem: Simplify the fraction {a * c}/{b * c}.\nSolution: The greatest common divisor of "
                f"{a * c} and {b * c} is {g}. Dividing numerator and denominator by {g} gives "
                f"{a * c // g}/{b * c // g}.\nThe answer is {a * c // g}/{b * c // g}.")
    elif kind == 3:
        p = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75])
        price = rng.randint(4, 80) * 10
        off = price * p // 100
        return (f"Problem: A jacket costs ${price}. It is on sale for {p}% off. What is the sale price?\n"
                f"Solution: The discount is {p}% of {price} = {price} * {p} / 100 = {off}. The sale price is "
                f"{price} - {off} = {price - off}.\nThe answer is ${price - off}.")
    elif kind == 4:
        n_terms = rng.randint(5, 40)
        s = n_terms * (2 * a + (n_terms - 1) * c) // 2
        last = a + (n_terms - 1) * c
        return (f"Problem: Find the sum of the first {n_terms} terms of the arithmetic sequence {a}, {a + c}, "
                f"{a + 2 * c}, ...\nSolution: The common difference is {c}. The last term is "
                f"{a} + ({n_terms} - 1) * {c} = {last}. The sum is {n_terms} * ({a} + {last}) / 2 = {s}.\n"
                f"The answer is {s}.")
    elif kind == 5:
        x, y = a * c, b * c
        steps, p_, q_ = [], max(x, y), min(x, y)
        while q_:
            steps.append(f"{p_} = {p_ // q_} * {q_} + {p_ % q_}")
            p_, q_ = q_, p_ % q_
        return (f"Problem: Find gcd({x}, {y}) with the Euclidean algorithm.\nSolution: "
                + "; ".join(steps) + f". The last non-zero remainder is {p_}.\nThe answer is {p_}.")
    elif kind == 6:
        w, h = a, b
        return (f"Problem: A rectangle is {w} cm wide and {h} cm tall. Find its area and perimeter.\n"
                f"Solution: Area = {w} * {h} = {w * h} square cm. Perimeter = 2 * ({w} + {h}) = "
                f"{2 * (w + h)} cm.\nThe answer is area {w * h}, perimeter {2 * (w + h)}.")
    elif kind == 7:
        n_, k_ = rng.randint(4, 12), rng.randint(1, 4)
        return (f"Problem: In how many ways can a team of {k_} be chosen from {n_} people?\nSolution: "
                f"This is C({n_}, {k_}) = {n_}! / ({k_}! * {n_ - k_}!) = {math.comb(n_, k_)}.\n"
                f"The answer is {math.comb(n_, k_)}.")
    elif kind == 8:
        co = [rng.randint(-9, 9) for _ in range(4)]
        poly = " + ".join(f"{co[i]}x^{3 - i}" for i in range(3)) + f" + {co[3]}"
        d = " + ".join(f"{co[i] * (3 - i)}x^{2 - i}" for i in range(2)) + f" + {co[2]}"
        return (f"Problem: Differentiate f(x) = {poly}.\nSolution: Apply the power rule term by term: the "
                f"derivative of a*x^n is n*a*x^(n-1), and a constant's derivative is 0. f'(x) = {d}.\n"
                f"The answer is f'(x) = {d}.")
    else:
        speed, hours = rng.randint(20, 120), rng.randint(2, 9)
        return (f"Problem: A train travels at {speed} km/h for {hours} hours and then {b} km more. How far "
                f"does it travel?\nSolution: Distance = speed * time = {speed} * {hours} = {speed * hours} km. "
                f"Adding {b} km gives {speed * hours + b} km.\nThe answer is {speed * hours + b} km.")
