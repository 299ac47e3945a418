"""Seeded synthetic arithmetic word problems: an in-domain family and out-of-domain families.

Every family is a list of templates; a template draws its numbers from a ``random.Random``
and returns the question, the gold answer (computed from those numbers) and a short reference
solution ending in "The answer is N.". Generation is deterministic in (family, seed, n), and
questions are unique within one call (``exclude`` keeps e.g. test questions out of train).

Families:

* ``add-sub`` (ID): one-step addition or subtraction of a person's things, numbers up to 10;
* ``mul-div`` (OOD, operation): one-step multiplication or exact division;
* ``two-step`` (OOD, structure): two chained additions/subtractions (numbers up to 4);
* ``reworded`` (OOD, wording): one-step addition/subtraction stated with other entities, units
  and sentence shapes (animals arriving, food eaten, money, time, distances).

Difficulty (``top``) was tuned on the embedded SmolLM2-135M-Instruct (chat template, default
instruction suffix, greedy, 320 new tokens) to put each family in the 10-40% accuracy range;
measured: add-sub 29% (n=200), mul-div 24% (n=200), two-step 11% (n=100), reworded 20.5%
(n=200). For comparison it scores about 0.5% on GSM8K.

The ``synthetic`` dataset preset (imm_ray.data.presets) reads the standard splits (`SPLITS`)
from ``<data dir>/synthetic/<split>.jsonl``; write them with ``write_synthetic_dataset`` or
``python -m imm_ray.data.synthetic DATA_DIR``. ``load_synthetic`` builds any split (or a bare
family name) in memory without files.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imm_ray.data.problems import DataError, LoadResult, Problem
from imm_ray.data.spec import DatasetSpec
from imm_ray.registry import Registry
from imm_ray.storage import write_jsonl

__all__ = [
    "FAMILIES",
    "SPLITS",
    "SyntheticFamily",
    "SyntheticItem",
    "SyntheticSplit",
    "generate_items",
    "generate_problems",
    "load_synthetic",
    "split_items",
    "write_synthetic_dataset",
]

logger = logging.getLogger(__name__)

PRESET_FOLDER = "synthetic"


@dataclass(frozen=True)
class SyntheticItem:
    """One generated problem with its reference solution and the numbers/operations behind it.

    ``steps`` lists (operation, operand) applied left to right to ``start``: the gold answer is
    recomputable from them (operations: "+", "-", "*", "/").
    """

    problem: Problem
    solution: str
    start: int
    steps: tuple[tuple[str, int], ...]
    template: str


# A template draws numbers up to a family's ``top`` and returns
# (question, start, steps, solution body without the answer).
Draw = tuple[str, int, tuple[tuple[str, int], ...], str]
Template = Callable[[random.Random, int], Draw]


@dataclass(frozen=True)
class SyntheticFamily:
    """A named set of templates; each problem picks one uniformly. ``top`` bounds the numbers
    the templates draw (the difficulty knob: operands for +/-, factors for * and /)."""

    name: str
    description: str
    templates: tuple[tuple[str, Template], ...]
    top: int


def apply_steps(start: int, steps: Iterable[tuple[str, int]]) -> int:
    """The value of start after applying (op, operand) steps left to right (exact integers)."""
    value = start
    for op, operand in steps:
        if op == "+":
            value += operand
        elif op == "-":
            value -= operand
        elif op == "*":
            value *= operand
        elif op == "/":
            if operand == 0 or value % operand:
                raise ValueError(f"{value} / {operand} is not an exact integer division")
            value //= operand
        else:
            raise ValueError(f"unknown operation {op!r}")
    return value


_NAMES = ("Tom", "Sara", "Ben", "Mia", "Leo", "Emma", "Sam", "Lily", "Max", "Anna")
_THINGS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "toy cars", "shells")
_PRONOUN = {"Tom": "He", "Ben": "He", "Leo": "He", "Sam": "He", "Max": "He",
            "Sara": "She", "Mia": "She", "Emma": "She", "Lily": "She", "Anna": "She"}


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _pair(rng: random.Random, low: int, high: int, subtract: bool) -> tuple[int, int]:
    """Two numbers in [low, high]; for subtraction the first is strictly larger."""
    a, b = rng.randint(low, high), rng.randint(low, high)
    if subtract:
        if a == b:
            a += 1
        a, b = max(a, b), min(a, b)
    return a, b


# --- ID: one-step addition / subtraction ------------------------------------------------------
def _id_buy(rng: random.Random, top: int) -> Draw:
    name, thing = _pick(rng, _NAMES), _pick(rng, _THINGS)
    a, b = _pair(rng, 2, top, subtract=False)
    return (f"{name} has {a} {thing}. {_PRONOUN[name]} gets {b} more {thing}. "
            f"How many {thing} does {name} have now?", a, (("+", b),),
            f"{name} has {a} {thing} and gets {b} more, so {a} + {b} = {a + b}.")


def _id_give(rng: random.Random, top: int) -> Draw:
    name, thing = _pick(rng, _NAMES), _pick(rng, _THINGS)
    a, b = _pair(rng, 2, top, subtract=True)
    return (f"{name} has {a} {thing}. {_PRONOUN[name]} gives {b} {thing} to a friend. "
            f"How many {thing} does {name} have left?", a, (("-", b),),
            f"{name} has {a} {thing} and gives away {b}, so {a} - {b} = {a - b}.")


def _id_find(rng: random.Random, top: int) -> Draw:
    name, thing = _pick(rng, _NAMES), _pick(rng, _THINGS)
    a, b = _pair(rng, 2, top, subtract=False)
    return (f"{name} had {a} {thing}. {_PRONOUN[name]} found {b} more {thing}. "
            f"How many {thing} does {name} have now?", a, (("+", b),),
            f"{name} had {a} {thing} and found {b} more, so {a} + {b} = {a + b}.")


def _id_lose(rng: random.Random, top: int) -> Draw:
    name, thing = _pick(rng, _NAMES), _pick(rng, _THINGS)
    a, b = _pair(rng, 2, top, subtract=True)
    return (f"{name} had {a} {thing}. {_PRONOUN[name]} lost {b} {thing}. "
            f"How many {thing} does {name} have now?", a, (("-", b),),
            f"{name} had {a} {thing} and lost {b}, so {a} - {b} = {a - b}.")


# --- OOD: multiplication / division ----------------------------------------------------------
def _mul_boxes(rng: random.Random, top: int) -> Draw:
    thing = _pick(rng, _THINGS)
    per, boxes = rng.randint(2, top), rng.randint(2, top)
    return (f"Each box holds {per} {thing}. How many {thing} are in {boxes} boxes?",
            per, (("*", boxes),), f"Each box holds {per} and there are {boxes} boxes, so "
            f"{per} * {boxes} = {per * boxes}.")


def _mul_rows(rng: random.Random, top: int) -> Draw:
    rows, seats = rng.randint(2, top), rng.randint(2, top)
    return (f"A room has {rows} rows of chairs with {seats} chairs in each row. "
            f"How many chairs are in the room?", rows, (("*", seats),),
            f"There are {rows} rows of {seats} chairs, so {rows} * {seats} = {rows * seats}.")


def _div_share(rng: random.Random, top: int) -> Draw:
    name, thing = _pick(rng, _NAMES), _pick(rng, _THINGS)
    friends, each = rng.randint(2, top), rng.randint(2, top)
    total = friends * each
    return (f"{name} shares {total} {thing} equally among {friends} friends. "
            f"How many {thing} does each friend get?", total, (("/", friends),),
            f"{total} {thing} are shared by {friends} friends, so {total} / {friends} = {each}.")


def _div_groups(rng: random.Random, top: int) -> Draw:
    size, groups = rng.randint(2, top), rng.randint(2, top)
    total = size * groups
    return (f"A teacher puts {total} students into groups of {size}. How many groups are there?",
            total, (("/", size),),
            f"{total} students in groups of {size} make {total} / {size} = {groups} groups.")


# --- OOD: two steps ---------------------------------------------------------------------------
def _two_buy_give(rng: random.Random, top: int) -> Draw:
    name, thing = _pick(rng, _NAMES), _pick(rng, _THINGS)
    a, b = _pair(rng, 2, top, subtract=False)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {thing}. {_PRONOUN[name]} buys {b} more and then gives {c} away. "
            f"How many {thing} does {name} have now?", a, (("+", b), ("-", c)),
            f"{a} + {b} = {a + b}, then {a + b} - {c} = {a + b - c}.")


def _two_bus(rng: random.Random, top: int) -> Draw:
    a = rng.randint(4, 2 * top)
    off = rng.randint(1, min(a - 1, top))
    on = rng.randint(1, top)
    return (f"A bus has {a} people on it. At the first stop {off} people get off and {on} people "
            f"get on. How many people are on the bus now?", a, (("-", off), ("+", on)),
            f"{a} - {off} = {a - off}, then {a - off} + {on} = {a - off + on}.")


def _two_gifts(rng: random.Random, top: int) -> Draw:
    name, thing = _pick(rng, _NAMES), _pick(rng, _THINGS)
    a, b, c = rng.randint(2, top), rng.randint(2, top), rng.randint(2, top)
    return (f"{name} got {a} {thing} from mom, {b} {thing} from dad and {c} {thing} from a friend. "
            f"How many {thing} did {name} get in all?", a, (("+", b), ("+", c)),
            f"{a} + {b} = {a + b}, then {a + b} + {c} = {a + b + c}.")


# --- OOD: other wording for one-step addition / subtraction ---------------------------------
_PLACES = (("birds", "in the tree"), ("ducks", "on the pond"), ("cats", "on the roof"))


def _re_arrive(rng: random.Random, top: int) -> Draw:
    animal, place = _PLACES[rng.randrange(len(_PLACES))]
    a, b = _pair(rng, 2, top, subtract=False)
    return (f"There are {a} {animal} {place}. {b} more {animal} come. "
            f"How many {animal} are {place} now?", a, (("+", b),),
            f"There are {a} {animal} and {b} more come, so {a} + {b} = {a + b}.")


def _re_eat(rng: random.Random, top: int) -> Draw:
    food = _pick(rng, ("oranges", "cookies", "grapes", "plums"))
    a, b = _pair(rng, 2, top, subtract=True)
    return (f"A basket has {a} {food}. {b} {food} are eaten. "
            f"How many {food} are in the basket now?", a, (("-", b),),
            f"The basket has {a} {food} and {b} are eaten, so {a} - {b} = {a - b}.")


def _re_money(rng: random.Random, top: int) -> Draw:
    name = _pick(rng, _NAMES)
    a, b = _pair(rng, 3, top, subtract=True)
    item = _pick(rng, ("a book", "a kite", "a ball", "a hat"))
    return (f"{name} had ${a} and spent ${b} on {item}. How many dollars are left?",
            a, (("-", b),), f"{name} had ${a} and spent ${b}, so {a} - {b} = {a - b}.")


def _re_distance(rng: random.Random, top: int) -> Draw:
    a, b = _pair(rng, 2, top, subtract=False)
    unit = _pick(rng, ("miles", "kilometers", "meters"))
    return (f"What is the total distance, in {unit}, of a trip made of a {a}-{unit[:-1]} ride "
            f"followed by a {b}-{unit[:-1]} walk?", a, (("+", b),),
            f"The trip is {a} {unit} plus {b} {unit}, so {a} + {b} = {a + b}.")


def _re_time(rng: random.Random, top: int) -> Draw:
    a, b = _pair(rng, 3, top, subtract=True)
    return (f"The movie lasts {a} minutes. We have already watched {b} minutes of it. "
            f"For how many more minutes will it play?", a, (("-", b),),
            f"It lasts {a} minutes and {b} have passed, so {a} - {b} = {a - b}.")


FAMILIES: Registry[SyntheticFamily] = Registry("synthetic family")
for _fam in (
    SyntheticFamily("add-sub", "ID: one-step addition/subtraction about a person's things, "
                    "numbers up to 10", (("buy", _id_buy), ("give", _id_give),
                                         ("find", _id_find), ("lose", _id_lose)), top=10),
    SyntheticFamily("mul-div", "OOD operation: one-step multiplication/exact division",
                    (("boxes", _mul_boxes), ("rows", _mul_rows), ("share", _div_share),
                     ("groups", _div_groups)), top=9),
    SyntheticFamily("two-step", "OOD structure: two chained additions/subtractions",
                    (("buy-give", _two_buy_give), ("bus", _two_bus), ("gifts", _two_gifts)),
                    top=4),
    SyntheticFamily("reworded", "OOD wording: one-step add/sub with other entities, units "
                    "and sentence shapes", (("arrive", _re_arrive), ("eat", _re_eat),
                                            ("money", _re_money), ("distance", _re_distance),
                                            ("time", _re_time)), top=10),
):
    FAMILIES.add(_fam.name, _fam)


def _family(name: str | SyntheticFamily) -> SyntheticFamily:
    if isinstance(name, SyntheticFamily):
        return name
    return FAMILIES.lookup(name)


def generate_items(family: str | SyntheticFamily, seed: int, n: int, exclude: Iterable[str] = (),
                   dataset: str | None = None) -> list[SyntheticItem]:
    """n distinct problems of a family, deterministic in (family, seed, n).

    Questions in ``exclude`` are skipped. ``dataset`` (default: the family name) names the
    Problems' dataset and prefixes their ids ("<dataset>-<index>"). DataError when the family
    cannot produce n distinct questions.
    """
    fam = _family(family)
    dataset = dataset or fam.name
    rng = random.Random(f"{fam.name}:{seed}")
    seen = set(exclude)
    items: list[SyntheticItem] = []
    attempts, max_attempts = 0, 50 * n + 1000
    while len(items) < n:
        attempts += 1
        if attempts > max_attempts:
            raise DataError(f"synthetic family {fam.name!r} produced only {len(items)} distinct "
                            f"questions of the {n} asked for (seed {seed})")
        label, template = fam.templates[rng.randrange(len(fam.templates))]
        question, start, steps, body = template(rng, fam.top)
        if question in seen:
            continue
        seen.add(question)
        answer = apply_steps(start, steps)
        problem = Problem(id=f"{dataset}-{len(items)}", question=question, answer=str(answer),
                          dataset=dataset)
        items.append(SyntheticItem(problem, f"{body} The answer is {answer}.", start,
                                   tuple(steps), label))
    return items


def generate_problems(family: str, seed: int, n: int, dataset: str | None = None) -> list[Problem]:
    """The Problems of ``generate_items(family, seed, n)``."""
    return [item.problem for item in generate_items(family, seed, n, dataset=dataset)]


@dataclass(frozen=True)
class SyntheticSplit:
    """A standard split: n problems of a family from a seed, disjoint from the splits named in
    ``disjoint_from`` (same family)."""

    family: str
    seed: int
    n: int
    disjoint_from: tuple[str, ...] = field(default=())


# The standard splits behind the `synthetic` dataset preset (split name -> recipe).
SPLITS: dict[str, SyntheticSplit] = {
    "train": SyntheticSplit("add-sub", seed=0, n=1000),
    # 600 each so a study can report 300+ questions per set beside a probe split; generation is
    # sequential, so the first 200 (all a split held before) are unchanged.
    "test": SyntheticSplit("add-sub", seed=1, n=600, disjoint_from=("train",)),
    "ood-mul-div": SyntheticSplit("mul-div", seed=2, n=600),
    "ood-two-step": SyntheticSplit("two-step", seed=3, n=600),
    "ood-reworded": SyntheticSplit("reworded", seed=4, n=600),
}


def split_items(split: str, dataset: str | None = None) -> list[SyntheticItem]:
    """Items of a standard split (SPLITS) or, for a bare family name, 200 items from seed 0."""
    recipe = SPLITS.get(split)
    if recipe is None:
        if split not in FAMILIES:
            raise DataError(f"unknown synthetic split {split!r}; known splits: {sorted(SPLITS)} "
                            f"or a family name: {sorted(FAMILIES)}")
        recipe = SyntheticSplit(split, seed=0, n=200)
    exclude = {item.problem.question for other in recipe.disjoint_from
               for item in split_items(other)}
    return generate_items(recipe.family, recipe.seed, recipe.n, exclude=exclude,
                          dataset=dataset or f"synthetic-{split}")


def load_synthetic(spec: DatasetSpec) -> LoadResult:
    """Build the problems of a spec whose split names a synthetic split, in memory.

    Honours offset and limit like a file source; problems are named after spec.name.
    """
    items = split_items(spec.split, dataset=spec.name)
    stop = None if spec.limit is None else spec.offset + spec.limit
    problems = [item.problem for item in items[spec.offset:stop]]
    return LoadResult(problems=problems, malformed=0, source=f"synthetic:{spec.split}")


def write_synthetic_dataset(root: str | Path, splits: Iterable[str] | None = None) -> Path:
    """Write ``<root>/synthetic/<split>.jsonl`` (id, question, answer, solution, family,
    template) for the standard splits; returns the folder. Existing files are overwritten."""
    folder = Path(root).expanduser() / PRESET_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits or SPLITS:
        rows = [{"id": it.problem.id, "question": it.problem.question, "answer": it.problem.answer,
                 "solution": it.solution, "family": SPLITS[split].family, "template": it.template}
                for it in split_items(split)]
        path = folder / f"{split}.jsonl"
        write_jsonl(path, rows)
        logger.info("wrote %d problems to %s", len(rows), path)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imm_ray.data.synthetic DATA_DIR``: write the standard splits."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("data_dir", help="data root; files go to DATA_DIR/synthetic/<split>.jsonl")
    parser.add_argument("--split", action="append", choices=sorted(SPLITS),
                        help="only this split (repeatable); default all")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_synthetic_dataset(args.data_dir, args.split)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
