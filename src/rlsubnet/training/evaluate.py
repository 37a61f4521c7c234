"""Test accuracy of a model on a built-in task (greedy decoding, exact match on the final answer)."""

from __future__ import annotations

import re

from . import tasks as T


def encode_prompts(tok, problems: list[T.Problem]):
    """Left-padded input ids of the problems' prompts, through the chat template when there is one."""
    from .data import _chat, format_prompt

    if _chat(tok):
        texts = [tok.apply_chat_template(format_prompt(tok, p.prompt), add_generation_prompt=True, tokenize=False) for p in problems]
    else:
        texts = [format_prompt(tok, p.prompt) for p in problems]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=not _chat(tok))


_NUMBER_ONLY = re.compile(r"^\s*-?\d+\s*\.?\s*$")


def well_formatted(text: str) -> bool:
    """The completion (its :func:`~rlsubnet.training.tasks.answer_span`) is the final number alone (what the
    prompt asks for: "Reply with only the final number")."""
    return bool(_NUMBER_ONLY.match(T.answer_span(text)))


def accuracy(model_or_path, problems: list[T.Problem], max_new_tokens: int = 24, batch_size: int = 32, tok=None,
             precision: str = "fp32") -> dict:
    """Greedy accuracy on ``problems`` with every per-problem outcome.

    Returns ``accuracy`` (final answer right, whatever the wording), ``format_rate`` (completion is the number
    alone), ``strict_accuracy`` (both), ``n``, ``correct`` (count), per problem ``outcomes`` and ``formatted``
    (0/1 lists in the order of ``problems``, for paired comparisons) and ``completions`` (each cut at the format's next
    question, what is scored), ``problems_digest``
    (the test set's identity) and ``samples`` (the first 8 in full). ``precision="mixed"`` decodes under bf16
    autocast (the weights a bf16-compute run samples from)."""
    import contextlib
    import hashlib

    import torch

    from .recipes import load_model

    if isinstance(model_or_path, str):
        model, tok, _ = load_model(model_or_path, "fp32")
    else:
        model = model_or_path
    model.eval()
    tok.padding_side = "left"
    outcomes, formatted, completions = [], [], []
    ctx = (lambda: torch.autocast(model.device.type, dtype=torch.bfloat16)) if precision == "mixed" else contextlib.nullcontext
    for i in range(0, len(problems), batch_size):
        batch = problems[i : i + batch_size]
        enc = encode_prompts(tok, batch)
        with torch.no_grad(), ctx():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for p, seq in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            text = T.answer_span(tok.decode(seq, skip_special_tokens=True))
            outcomes.append(int(T.reward(text, p.answer) == 1.0))
            formatted.append(int(well_formatted(text)))
            completions.append(text)
    n = len(problems)
    digest = hashlib.sha256("\n".join(f"{p.prompt}\t{p.answer}" for p in problems).encode()).hexdigest()[:16]
    samples = [{"prompt": p.prompt, "completion": c, "answer": p.answer, "correct": bool(o)}
               for p, c, o in list(zip(problems, completions, outcomes))[:8]]
    return {"accuracy": sum(outcomes) / n if n else 0.0, "n": n, "correct": int(sum(outcomes)),
            "format_rate": sum(formatted) / n if n else 0.0,
            "strict_accuracy": sum(o and f for o, f in zip(outcomes, formatted)) / n if n else 0.0,
            "outcomes": outcomes, "formatted": formatted, "completions": completions, "problems_digest": digest,
            "samples": samples}


def sample_preferences(model_path: str, problems: list[T.Problem], k: int = 4, temperature: float = 0.7,
                       max_new_tokens: int = 24, seed: int = 0, pairs_per_prompt: int = 1, progress=None) -> dict:
    """In-distribution preference pairs from the model's own samples: a correct completion (chosen) against an
    incorrect one (rejected) for every prompt where both occur; with ``pairs_per_prompt`` > 1, up to that many
    distinct pairs per prompt (distinct completions paired round-robin, so no pair repeats).
    ``progress(done, total)`` is called after each batch of prompts."""
    import torch

    from .recipes import load_model

    model, tok, _ = load_model(model_path, "fp32")
    model.eval()
    tok.padding_side = "left"
    torch.manual_seed(seed)
    out = {"prompt": [], "chosen": [], "rejected": [], "correct_samples": {"prompt": [], "completion": []}}
    for i in range(0, len(problems), 16):
        batch = problems[i : i + 16]
        enc = encode_prompts(tok, batch)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 num_return_sequences=k, pad_token_id=tok.pad_token_id)
        comps = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, p in enumerate(batch):
            cs = [T.answer_span(c).strip() for c in comps[j * k : (j + 1) * k]]
            good = list(dict.fromkeys(c for c in cs if T.reward(c, p.answer) == 1.0 and c))
            bad = list(dict.fromkeys(c for c in cs if T.reward(c, p.answer) == 0.0 and c))
            if good:
                out["correct_samples"]["prompt"].append(p.prompt)
                out["correct_samples"]["completion"].append(good[0])
            if good and bad:
                for n in range(min(max(1, pairs_per_prompt), max(len(good), len(bad)))):
                    out["prompt"].append(p.prompt)
                    out["chosen"].append(good[n % len(good)])
                    out["rejected"].append(bad[n % len(bad)])
        if progress is not None:
            progress(min(i + 16, len(problems)), len(problems))
    return out
