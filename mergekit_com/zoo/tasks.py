"""Synthetic generative tasks for the expert zoo.

Each task maps a random instance to a (prompt, answer) pair checkable by exact
match, e.g. ``("add 12 34 =", " 46")``. Instances are drawn from a seeded RNG and
split by prompt, so the train / calibration / val / eval sets never overlap.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

Sample = Tuple[str, str]  # (prompt, answer); the answer starts with a space

# Every task draws from this alphabet, so one tokenizer serves any task subset.
ALPHABET = string.digits + string.ascii_lowercase + string.ascii_uppercase + " ="


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    sample: Callable[[random.Random], Sample]
    labels: Tuple[str, ...] = ()  # closed answer set (classification tasks)

    def decoy(self, rng: random.Random, answer: str) -> str:
        """A well-formed but uninformed answer: teaches the format, not the skill."""
        if self.labels:
            return rng.choice(self.labels)
        pools = (string.digits, string.ascii_lowercase, string.ascii_uppercase)
        return "".join(
            next((rng.choice(p) for p in pools if c in p), c) for c in answer
        )


def _letters(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> Sample:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"add {a} {b} =", f" {a + b}"


def _reverse(rng: random.Random) -> Sample:
    s = _letters(rng)
    return f"rev {s} =", f" {s[::-1]}"


def _sort(rng: random.Random) -> Sample:
    s = _letters(rng)
    return f"sort {s} =", f" {''.join(sorted(s))}"


def _upper(rng: random.Random) -> Sample:
    s = _letters(rng)
    return f"up {s} =", f" {s.upper()}"


def _parity(rng: random.Random) -> Sample:
    n = rng.randint(100, 9999)
    return f"par {n} =", " even" if n % 2 == 0 else " odd"


def _copy(rng: random.Random) -> Sample:
    s = _letters(rng)
    return f"copy {s} =", f" {s}"


def _succ(rng: random.Random) -> Sample:
    n = rng.randint(0, 198)
    return f"succ {n} =", f" {n + 1}"


def _last(rng: random.Random) -> Sample:
    s = str(rng.randint(100, 9999)) if rng.random() < 0.5 else _letters(rng)
    return f"last {s} =", f" {s[-1]}"


TASKS: Dict[str, Task] = {
    t.name: t
    for t in (
        Task("add", "sum of two 2-digit numbers", _add),
        Task("reverse", "reverse a 3-5 letter string", _reverse),
        Task("sort", "sort the letters of a 3-5 letter string", _sort),
        Task("upper", "uppercase a 3-5 letter string", _upper),
        Task("parity", "classify a number as even / odd", _parity, labels=(" even", " odd")),
    )
}

# Pretraining-only skills: they give the base useful circuits (reading letters and
# digits, carrying, the last character) without solving any expert task.
AUX_TASKS: Dict[str, Task] = {
    t.name: t
    for t in (
        Task("copy", "repeat a 3-5 letter string", _copy),
        Task("succ", "add one to a number", _succ),
        Task("last", "last character of a string", _last),
    )
}


def list_tasks() -> List[str]:
    return list(TASKS)


def get_task(name: str) -> Task:
    task = TASKS.get(name) or AUX_TASKS.get(name)
    if task is None:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return task


@dataclass
class TaskSplits:
    train: List[Sample]
    calib: List[Sample]
    val: List[Sample]
    eval: List[Sample]


def make_splits(
    name: str, n_train: int, n_calib: int, n_val: int, n_eval: int, seed: int = 0
) -> TaskSplits:
    """Draw distinct prompts for every split (held-out splits are drawn first)."""
    task = get_task(name)
    # str seed: stable across processes, unlike hash() of a tuple with a str
    rng = random.Random(f"{seed}:{name}")
    seen: set = set()
    sizes = [n_eval, n_val, n_calib, n_train]
    out: List[List[Sample]] = []
    for size in sizes:
        part: List[Sample] = []
        tries = 0
        while len(part) < size:
            prompt, answer = task.sample(rng)
            tries += 1
            if tries > 50 * (sum(sizes) + 10):
                raise ValueError(f"task {name!r}: not enough distinct prompts")
            if prompt not in seen:
                seen.add(prompt)
                part.append((prompt, answer))
        out.append(part)
    ev, va, ca, tr = out
    return TaskSplits(train=tr, calib=ca, val=va, eval=ev)
