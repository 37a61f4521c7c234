"""Prompts and training data for the built-in tasks: how a problem becomes a prompt, a completion, a
preference pair or a KTO example for each TRL trainer (``rlsubnet train`` and the study)."""

from __future__ import annotations

import random

from ..io.errors import InputError
from . import tasks as T
from .config import ALGOS, GENERATIVE, PREFERENCE


def _chat(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def format_prompt(tok, text: str):
    return [{"role": "user", "content": text}] if _chat(tok) else f"Q: {text}\nA:"


def format_completion(tok, text: str):
    return [{"role": "assistant", "content": text}] if _chat(tok) else f" {text}"


def corrupt(p: T.Problem, r: random.Random) -> str:
    """A reference-style solution with a wrong final answer (the rejected side of off-policy pairs)."""
    wrong = p.answer + r.choice([-3, -2, -1, 1, 2, 3, 10])
    return p.solution.replace(f"The answer is {p.answer}.", f"The answer is {wrong}.")


def make_dataset(cfg, tok):
    """The training set of a run (``cfg``: a :class:`~rlsubnet.training.recipes.TrainConfig`) in the format its trainer expects."""
    from datasets import Dataset

    # the problems are fixed (seed 0); the training seed changes sampling and data order only, which is
    # what the paper's "different seed" overlap varies
    probs = T.generate(cfg.task, cfg.n_train, seed=0, level=cfg.level, split="train")
    r = random.Random(cfg.seed)
    a = cfg.algo
    if a in GENERATIVE:
        return Dataset.from_dict({"prompt": [format_prompt(tok, p.prompt) for p in probs], "answer": [p.answer for p in probs]})
    if a == "sft":
        d = cfg.sft_data or {"prompt": [p.prompt for p in probs], "completion": [p.solution for p in probs]}
        return Dataset.from_dict({"prompt": [format_prompt(tok, x) for x in d["prompt"]],
                                  "completion": [format_completion(tok, x) for x in d["completion"]]})
    if a in PREFERENCE:
        d = cfg.preference or {"prompt": [p.prompt for p in probs], "chosen": [p.solution for p in probs],
                               "rejected": [corrupt(p, r) for p in probs]}
        if a == "kto":
            n = len(d["prompt"])
            return Dataset.from_dict({"prompt": [format_prompt(tok, x) for x in d["prompt"] * 2],
                                      "completion": [format_completion(tok, x) for x in d["chosen"] + d["rejected"]],
                                      "label": [True] * n + [False] * n})
        return Dataset.from_dict({"prompt": [format_prompt(tok, x) for x in d["prompt"]],
                                  "chosen": [format_completion(tok, x) for x in d["chosen"]],
                                  "rejected": [format_completion(tok, x) for x in d["rejected"]]})
    if a == "ppo":
        def enc(p):
            fp = format_prompt(tok, p.prompt)
            ids = tok.apply_chat_template(fp, add_generation_prompt=True, tokenize=True) if _chat(tok) else tok(fp)["input_ids"]
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return Dataset.from_dict({"input_ids": [enc(p) for p in probs]})
    raise InputError(f"--algo: unknown algorithm {a!r} (choose from {', '.join(ALGOS)}).")


