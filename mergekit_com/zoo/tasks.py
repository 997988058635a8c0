"""Synthetic generative tasks for the expert zoo.

Each task maps a random instance to a (prompt, answer) pair checkable by exact
match, e.g. ``("add 12 34 =", " 46")``, plus a *distractor*: the answer of a
plausible wrong skill (forgetting the carry, echoing the input, ...). The base is
pretrained on a mix of true and distractor answers, so it holds the skill but
prefers the mistake; fine-tuning only has to tip that balance, as with real
Hub fine-tunes that elicit what the base already knows.

Instances come from a seeded RNG and are split by prompt, so the
train / calibration / val / eval sets never overlap.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

Sample = Tuple[str, str]  # (prompt, answer); the answer starts with a space
Instance = Tuple[str, str, str]  # (prompt, answer, distractor answer)

# Every task draws from this alphabet, so one tokenizer serves any task subset.
ALPHABET = string.digits + string.ascii_lowercase + string.ascii_uppercase + " ="


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    distractor: str  # the wrong skill the base leans towards
    sample: Callable[[random.Random], Instance]
    # written for a chat template, whose turns mark where the prompt ends: its prompts have
    # no " =" (a plain-text zoo adds it, make_splits(plain=True))
    chat: bool = False


def _letters(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> Instance:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    no_carry = "".join(str((int(x) + int(y)) % 10) for x, y in zip(str(a), str(b)))
    return f"add {a} {b} =", f" {a + b}", f" {int(no_carry)}"


def _max(rng: random.Random) -> Instance:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"max {a} {b} =", f" {max(a, b)}", f" {min(a, b)}"


def _reverse(rng: random.Random) -> Instance:
    s = _letters(rng)
    return f"rev {s} =", f" {s[::-1]}", f" {s}"


def _sort(rng: random.Random) -> Instance:
    s = _letters(rng)
    return f"sort {s} =", f" {''.join(sorted(s))}", f" {''.join(sorted(s, reverse=True))}"


def _upper(rng: random.Random) -> Instance:
    s = _letters(rng)
    return f"up {s} =", f" {s.upper()}", f" {s.capitalize()}"


def _parity(rng: random.Random) -> Instance:
    n = str(rng.randint(100, 9999))

    def label(digit: str) -> str:
        return " even" if int(digit) % 2 == 0 else " odd"

    return f"par {n} =", label(n[-1]), label(n[0])


def _spaced(sample: Callable[[random.Random], Instance]) -> Callable[[random.Random], Instance]:
    """The same task with its letters written apart ("rev a b c =" -> " c b a").

    A BPE tokenizer (SmolLM2's) merges runs of letters into tokens ("abcd" -> "ab", "cd"),
    so reversing or sorting them needs spelling skills a 135M model lacks; spaced
    letters are one token each (" a"), which it learns in a few dozen steps.
    """

    def spread(text: str) -> str:
        return " ".join(text) if len(text) > 1 and text.isalpha() else text

    def spaced(rng: random.Random) -> Instance:
        prompt, answer, distractor = sample(rng)
        verb, arg, eq = prompt.split(" ")
        return (f"{verb} {spread(arg)} {eq}", " " + spread(answer[1:]), " " + spread(distractor[1:]))

    return spaced


# Chat tasks (the `chat` preset): other skills, asked in a user turn and answered in the
# assistant's, without the " =" marker and the answer's leading space.
def _shift(rng: random.Random) -> Instance:
    s = _letters(rng)
    nxt = "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s)
    prv = "".join(chr((ord(c) - 97 - 1) % 26 + 97) for c in s)
    return f"shift {s}", nxt, prv


def _count(rng: random.Random) -> Instance:
    letter = rng.choice("abc")
    s = "".join(rng.choice("abcd") for _ in range(rng.randint(4, 8)))
    return f"count {letter} in {s}", str(s.count(letter)), str(len(s))


def _swap(rng: random.Random) -> Instance:
    a, b = _letters(rng, 2, 4), _letters(rng, 2, 4)
    return f"swap {a} {b}", f"{b} {a}", f"{a} {b}"


def _double(rng: random.Random) -> Instance:
    s = _letters(rng, 2, 4)
    return f"double {s}", "".join(c + c for c in s), s + s


def _last(rng: random.Random) -> Instance:
    words = [_letters(rng, 2, 5) for _ in range(rng.randint(2, 4))]
    return f"last {' '.join(words)}", "".join(w[-1] for w in words), "".join(w[0] for w in words)


TASKS: Dict[str, Task] = {
    t.name: t
    for t in (
        Task("max", "larger of two 2-digit numbers", "the smaller one", _max),
        Task("reverse", "reverse a 3-5 letter string", "echo the string", _reverse),
        Task("sort", "sort the letters of a 3-5 letter string", "sort descending", _sort),
        Task("upper", "uppercase a 3-5 letter string", "capitalize the first letter", _upper),
        Task("parity", "is the number even or odd", "parity of the first digit", _parity),
        # Registered but not in the tiny preset: a 3-layer model needs ~1000 steps of
        # addition alone to learn the carry, far beyond the tiny build budget.
        Task("add", "sum of two 2-digit numbers", "digit-wise sum without carry", _add),
        # spaced letters, for subword tokenizers (the smollm2 preset)
        Task("reverse_sp", "reverse 3-5 spaced letters", "echo them", _spaced(_reverse)),
        Task("sort_sp", "sort 3-5 spaced letters", "sort descending", _spaced(_sort)),
        Task("upper_sp", "uppercase 3-5 spaced letters", "capitalize the first", _spaced(_upper)),
        # chat tasks (the chat preset)
        Task("shift", "shift each letter one place on (a -> b)", "one place back", _shift, chat=True),
        Task("count", "how often a letter occurs in a string", "the string's length", _count, chat=True),
        Task("swap", "swap two words", "echo them", _swap, chat=True),
        Task("double", "double every letter", "repeat the string", _double, chat=True),
        Task("last", "last letter of every word", "the first letters", _last, chat=True),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


def task_names(text: Optional[str]) -> Optional[List[str]]:
    """A ``--tasks a,b`` flag as names; None when it was not given. A flag that names no
    task (``--tasks ''``: an unset shell variable, say) is refused rather than read as
    "every task", which would build or score what the user did not ask for."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--tasks {text!r} names no task: give comma-separated task names "
                         f"(python -m mergekit_com.zoo --list-tasks), or leave --tasks out for every task")
    return names


@dataclass
class TaskSplits:
    train: List[Instance]  # keeps the distractor, for the base's pretraining mix
    calib: List[Sample]
    val: List[Sample]
    eval: List[Sample]


def needs_marker(name: str) -> bool:
    """A chat task in a plain-text zoo: nothing would mark where its prompt ends ("last ab
    cd" + "bd"; its expert learnt nothing in a tiny zoo), so ``make_splits(plain=True)``
    writes it as the plain tasks are written ("last ab cd =" + " bd")."""
    return get_task(name).chat


def _with_marker(inst: Instance) -> Instance:
    prompt, answer, distractor = inst
    return prompt + " =", " " + answer, " " + distractor


def make_splits(
    name: str, n_train: int, n_calib: int, n_val: int, n_eval: int, seed: int = 0, plain: bool = False
) -> TaskSplits:
    """Draw distinct prompts for every split (held-out splits are drawn first).

    plain=True (zoos without a chat template) writes chat tasks as the plain tasks are
    written: "swap ab cd =" -> " cd ab"."""
    task = get_task(name)
    marked = plain and needs_marker(name)
    # a str seed is stable across processes (unlike hash() of a str)
    rng = random.Random(f"{seed}:{name}")
    seen: set = set()
    sizes = [n_eval, n_val, n_calib, n_train]
    budget = 50 * (sum(sizes) + 10)
    parts: List[List[Instance]] = []
    for size in sizes:
        part: List[Instance] = []
        while len(part) < size:
            inst = task.sample(rng)
            budget -= 1
            if budget < 0:
                raise ValueError(f"task {name!r}: not enough distinct prompts")
            if inst[0] not in seen:
                seen.add(inst[0])
                part.append(inst)
        parts.append(part)
    if marked:
        parts = [[_with_marker(i) for i in part] for part in parts]
    ev, va, ca, tr = parts
    return TaskSplits(
        train=tr,
        calib=[(p, a) for p, a, _ in ca],
        val=[(p, a) for p, a, _ in va],
        eval=[(p, a) for p, a, _ in ev],
    )
