"""Built-in tasks with verifiable answers, generated from a seed, with disjoint train and test splits.

- ``add``: "What is 37 + 5?" (``digits`` sets the operand sizes; level 1 = 1-digit + 1-digit);
- ``word``: multi-step word problems ("Ann has 7 apples, buys 3 more and gives away 2. How many ...");
- ``compare``: "Which is larger, 48 or 84?" (a task of a different kind, for the "different data" overlap).

Each problem has a prompt and an integer answer. The reward is 1.0 when the final answer of a completion
(the integer after the last "=", else the last integer) equals the answer, else 0.0.

Train and test splits share no problem and no *twin*: problems with the same ``key`` (``a + b`` and
``b + a``; "48 or 84" and "84 or 48") always fall in the same split, so a test problem is never a
reordering of a training one. :func:`split_sizes` says how many problems each split can hold.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

SUFFIX = " Reply with only the final number, no words."
_INT = re.compile(r"-?\d+")


@functools.lru_cache(maxsize=32)
def _pool_cached(task: str, level: int, seed: int, want: int) -> tuple:
    return tuple(_pool(task, level, seed, want))


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: int
    solution: str  # a reference solution in a fixed template (off-distribution text for SFT/DPO)
    key: str = ""  # problems with one key are twins (the same operands in another order): never split apart

    @property
    def twin_key(self) -> str:
        return self.key or self.prompt


def _add(r: random.Random, level: int) -> Problem:
    da, db = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2)}.get(level, (level, level))
    a = r.randint(10 ** (da - 1) if da > 1 else 0, 10**da - 1)
    b = r.randint(10 ** (db - 1) if db > 1 else 0, 10**db - 1)
    return Problem(f"What is {a} + {b}?{SUFFIX}", a + b, f"{a} + {b} = {a + b}. The answer is {a + b}.", f"add {min(a, b)} {max(a, b)}")


_NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana"]
_ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps"]


def _word(r: random.Random, level: int) -> Problem:
    n, item = r.choice(_NAMES), r.choice(_ITEMS)
    hi = 5 * level + 4
    a, b = r.randint(2, hi), r.randint(1, hi)
    c = r.randint(1, a + b - 1)
    text = f"{n} has {a} {item}, gets {b} more and gives away {c}. How many {item} does {n} have now?{SUFFIX}"
    ans = a + b - c
    return Problem(text, ans, f"{a} + {b} = {a + b}. {a + b} - {c} = {ans}. The answer is {ans}.", f"word {min(a, b)} {max(a, b)} {c}")


def _compare(r: random.Random, level: int) -> Problem:
    hi = 10 ** (level + 1) - 1
    a, b = r.sample(range(1, hi + 1), 2)
    return Problem(f"Which is larger, {a} or {b}?{SUFFIX}", max(a, b), f"{max(a, b)} > {min(a, b)}. The answer is {max(a, b)}.",
                   f"compare {min(a, b)} {max(a, b)}")


TASKS = {"add": _add, "word": _word, "compare": _compare}


def _pool(task: str, level: int, seed: int, want: int) -> list[Problem]:
    """Up to ``want`` distinct problems in a fixed order (the task's generator from a fixed seed)."""
    gen = TASKS[task]
    r = random.Random(f"{task}-{level}-{seed}")
    seen: dict[str, Problem] = {}
    misses = 0
    while len(seen) < want and misses < 2000:  # 2000 draws in a row without a new problem: the task is exhausted
        p = gen(r, level)
        misses = misses + 1 if p.prompt in seen else 0
        seen.setdefault(p.prompt, p)
    return list(seen.values())


def _split(probs: list[Problem], split: str) -> list[Problem]:
    """Twin groups alternate between train and test in order of first appearance (a group never straddles)."""
    order: dict[str, int] = {}
    for p in probs:
        order.setdefault(p.twin_key, len(order))
    want = 0 if split == "train" else 1
    return [p for p in probs if order[p.twin_key] % 2 == want]


def generate(task: str, n: int, seed: int = 0, level: int = 1, split: str = "train") -> list[Problem]:
    """``n`` distinct problems of one split (fewer when the task has fewer); train and test are disjoint,
    twins included, by construction, and do not depend on ``n``."""
    if task not in TASKS:
        from ..io.errors import InputError

        raise InputError(f"--task: unknown task {task!r} (choose from {', '.join(TASKS)}).")
    return _split(list(_pool_cached(task, level, seed, POOL)), split)[:n]


POOL = 4000  # problems drawn per task and level before splitting: both splits are prefixes of fixed lists


def split_sizes(task: str, level: int = 1, seed: int = 0) -> dict[str, int]:
    """How many problems each split holds (1-digit addition has only 100 problems in all)."""
    probs = list(_pool_cached(task, level, seed, POOL))
    return {s: len(_split(probs, s)) for s in ("train", "test")}


SCORING = 2  # version of how a completion is scored (2: cut at TURN); part of every cached evaluation's key
TURN = "\nQ:"  # the plain prompt format's next turn ("Q: ...\nA:"), where a base model's answer ends


def answer_span(text: str) -> str:
    """The completion up to the first new question (``"\\nQ:"``): a base model prompted with the plain
    "Q: ...\\nA:" format does not stop after its answer but goes on to write the next question and answer, and
    what it writes there is not its answer (lm-evaluation-harness cuts base-model generations at the format's
    next-turn marker the same way). A chat model's completion has no such marker and is returned whole."""
    i = text.find(TURN)
    return text if i < 0 else text[:i]


def extract_answer(text: str) -> int | None:
    """The integer after the last "=", else the last integer in the text (of its :func:`answer_span`)."""
    text = answer_span(text)
    if "=" in text:
        m = _INT.search(text.rsplit("=", 1)[1])
        if m:
            return int(m.group())
    ms = _INT.findall(text)
    return int(ms[-1]) if ms else None


def reward(completion: str, answer: int) -> float:
    return 1.0 if extract_answer(completion) == int(answer) else 0.0


def completion_text(c) -> str:
    """A TRL completion as text (plain string, or a conversational list of messages)."""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return " ".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in c)
    return str(c)


def exact_match_reward(completions, answer, **_) -> list[float]:
    """A TRL reward function: 1.0 for the right final answer."""
    return [reward(completion_text(c), a) for c, a in zip(completions, answer)]


def digits_reward(completions, **_) -> list[float]:
    """A dense shaping reward (share of digit characters): gives tiny random models a learning signal."""
    out = []
    for c in completions:
        t = completion_text(c)
        out.append(sum(ch.isdigit() for ch in t) / max(len(t), 1))
    return out


REWARDS = {"exact": exact_match_reward, "digits": digits_reward}
