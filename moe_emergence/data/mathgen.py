"""mathgen: a small seeded generator of school maths problems with worked, checked solutions.

Each template draws its numbers from a ``random.Random``, writes the question and a step-by-step
solution, and checks the final answer by an independent route (substitution, the inverse operation,
exact ``fractions.Fraction`` arithmetic) before returning it: a wrong answer raises ``RuntimeError``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

NAMES = ("Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemi", "Liam")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells")


@dataclass(frozen=True)
class MathProblem:
    template: str
    question: str
    steps: tuple[str, ...]
    answer: Fraction

    @property
    def text(self) -> str:
        solution = "\n".join(self.steps)
        return f"Question: {self.question}\nSolution:\n{solution}\nAnswer: {fmt(self.answer)}"


def fmt(x: Fraction | int) -> str:
    """A number as a school answer: an integer, or a fraction in lowest terms."""
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def check(ok: bool, template: str, what: str) -> None:
    if not ok:
        raise RuntimeError(f"mathgen template {template!r} produced a wrong answer: {what}")


def arithmetic(rng: random.Random) -> MathProblem:
    a, b, c, d = (rng.randint(2, 60) for _ in range(4))
    op1, op2 = rng.choice("+-"), rng.choice("+-")
    expr = f"{a} {op1} {b} * {c} {op2} {d}"
    prod = b * c
    first = a + prod if op1 == "+" else a - prod
    result = first + d if op2 == "+" else first - d
    steps = (
        f"Multiplication comes first: {b} * {c} = {prod}.",
        f"Then work left to right: {a} {op1} {prod} = {first}.",
        f"{first} {op2} {d} = {result}.",
    )
    check(eval(compile(expr, "<mathgen>", "eval"), {"__builtins__": {}}) == result, "arithmetic", expr)
    return MathProblem("arithmetic", f"Calculate {expr}.", steps, Fraction(result))


def fractions(rng: random.Random) -> MathProblem:
    b, d = rng.randint(2, 12), rng.randint(2, 12)
    a, c = rng.randint(1, b - 1), rng.randint(1, 2 * d)
    op = rng.choice("+-")
    lcd = b * d // math.gcd(b, d)
    a2, c2 = a * (lcd // b), c * (lcd // d)
    num = a2 + c2 if op == "+" else a2 - c2
    result = Fraction(num, lcd)
    steps = [
        f"The least common denominator of {b} and {d} is {lcd}.",
        f"{a}/{b} = {a2}/{lcd} and {c}/{d} = {c2}/{lcd}.",
        f"{a2}/{lcd} {op} {c2}/{lcd} = {num}/{lcd}.",
    ]
    if result.denominator != lcd:
        steps.append(f"Simplify: {num}/{lcd} = {fmt(result)}.")
    exact = Fraction(a, b) + Fraction(c, d) if op == "+" else Fraction(a, b) - Fraction(c, d)
    check(exact == result, "fractions", f"{a}/{b} {op} {c}/{d}")
    return MathProblem("fractions", f"What is {a}/{b} {op} {c}/{d}?", tuple(steps), result)


def percentages(rng: random.Random) -> MathProblem:
    price = 4 * rng.randint(3, 150)
    pct = rng.choice((5, 10, 12, 15, 20, 25, 30, 35, 40, 50, 60, 75))
    item = rng.choice(("jacket", "bicycle", "lamp", "backpack", "game", "chair", "tent", "watch", "kettle"))
    change = Fraction(pct * price, 100)
    if rng.random() < 0.5:
        result = price - change
        q = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
        steps = (
            f"{pct}% of {price} is {pct}/100 * {price} = {fmt(change)}.",
            f"Sale price = {price} - {fmt(change)} = {fmt(result)}.",
        )
        check(result / price == 1 - Fraction(pct, 100), "percentages", q)
    else:
        result = price + change
        q = f"A {item} costs ${price}. The price goes up by {pct}%. What is the new price in dollars?"
        steps = (
            f"{pct}% of {price} is {pct}/100 * {price} = {fmt(change)}.",
            f"New price = {price} + {fmt(change)} = {fmt(result)}.",
        )
        check(result / price == 1 + Fraction(pct, 100), "percentages", q)
    return MathProblem("percentages", q, steps, result)


def linear_equations(rng: random.Random) -> MathProblem:
    a = rng.choice([k for k in range(-9, 10) if k not in (0, 1)])
    x = rng.randint(-20, 20)
    b = rng.randint(-30, 30)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    q = f"Solve for x: {a}x {sign} {abs(b)} = {c}."
    undo = "Subtract" if b >= 0 else "Add"
    steps = (
        f"{undo} {abs(b)} on both sides: {a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}.",
        f"Divide both sides by {a}: x = {c - b} / {a} = {fmt(Fraction(c - b, a))}.",
    )
    result = Fraction(c - b, a)
    check(a * result + b == c, "linear_equations", q)
    return MathProblem("linear_equations", q, steps, result)


UNITS = {  # (big unit, small unit, small per big)
    "length": ("kilometres", "metres", 1000),
    "short length": ("metres", "centimetres", 100),
    "seconds": ("minutes", "seconds", 60),
    "days": ("days", "hours", 24),
    "mass": ("kilograms", "grams", 1000),
    "volume": ("litres", "millilitres", 1000),
    "time": ("hours", "minutes", 60),
    "money": ("dollars", "cents", 100),
}


def unit_conversion(rng: random.Random) -> MathProblem:
    big, small, factor = UNITS[rng.choice(sorted(UNITS))]
    if rng.random() < 0.5:
        amount = Fraction(rng.randint(1, 400), rng.choice((1, 2, 4)))
        result = amount * factor
        q = f"How many {small} are in {fmt(amount)} {big}?"
        steps = (f"1 {big[:-1]} = {factor} {small}.", f"{fmt(amount)} * {factor} = {fmt(result)} {small}.")
        check(result / factor == amount, "unit_conversion", q)
    else:
        amount = Fraction(rng.randint(1, 300) * factor // rng.choice((1, 2, 4, 5)))
        result = amount / factor
        q = f"Convert {fmt(amount)} {small} to {big}."
        steps = (f"1 {big[:-1]} = {factor} {small}.", f"{fmt(amount)} / {factor} = {fmt(result)} {big}.")
        check(result * factor == amount, "unit_conversion", q)
    return MathProblem("unit_conversion", q, steps, result)


def rates(rng: random.Random) -> MathProblem:
    name = rng.choice(NAMES)
    kind = rng.choice(("distance", "time", "work"))
    if kind == "distance":
        speed, hours = rng.randint(3, 90), rng.randint(2, 9)
        result = Fraction(speed * hours)
        q = f"{name} travels at {speed} km per hour for {hours} hours. How many kilometres does {name} travel?"
        steps = ("Distance = speed * time.", f"{speed} * {hours} = {fmt(result)} km.")
        check(result / hours == speed, "rates", q)
    elif kind == "time":
        speed, hours = rng.randint(3, 90), rng.randint(2, 9)
        dist = speed * hours
        result = Fraction(dist, speed)
        q = f"A train covers {dist} km at {speed} km per hour. How many hours does the trip take?"
        steps = ("Time = distance / speed.", f"{dist} / {speed} = {fmt(result)} hours.")
        check(result * speed == dist, "rates", q)
    else:
        item = rng.choice(ITEMS)
        per_hour, hours, workers = rng.randint(2, 30), rng.randint(2, 8), rng.randint(2, 6)
        one = per_hour * hours
        result = Fraction(one * workers)
        q = (
            f"{name} packs {per_hour} {item} per hour. {workers} people work at the same rate for {hours} "
            f"hours. How many {item} do they pack in total?"
        )
        steps = (
            f"One person packs {per_hour} * {hours} = {one} {item}.",
            f"{workers} people pack {one} * {workers} = {fmt(result)} {item}.",
        )
        check(result == Fraction(per_hour) * hours * workers, "rates", q)
    return MathProblem("rates", q, steps, result)


TEMPLATES: dict[str, Callable[[random.Random], MathProblem]] = {
    "arithmetic": arithmetic,
    "fractions": fractions,
    "percentages": percentages,
    "linear_equations": linear_equations,
    "unit_conversion": unit_conversion,
    "rates": rates,
}


def generate_problems(num_problems: int, seed: int, templates: list[str] | None = None) -> list[MathProblem]:
    """``num_problems`` checked problems, templates drawn uniformly from ``templates`` (default: all)."""
    names = list(templates) if templates else list(TEMPLATES)
    bad = [t for t in names if t not in TEMPLATES]
    if bad:
        raise ValueError(f"mathgen: unknown templates {bad}; allowed: {sorted(TEMPLATES)}")
    rng = random.Random(f"mathgen-{seed}")
    return [TEMPLATES[rng.choice(names)](rng) for _ in range(num_problems)]
