"""One training job with a real TRL trainer, optionally on a subnetwork only (``rlsubnet train``).

Every algorithm builds its optimizer and scheduler with :func:`build_masked_optimizer` (masked or not),
so a masked and an unmasked run differ only by the mask. The result is a normal Hugging Face checkpoint
folder in the dtype of the input checkpoint, plus ``train_log.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..io.errors import InputError
from ..io.optional import need
from . import tasks as T
from .config import (  # noqa: F401  (re-exported: recipes' public names)
    ALGOS,
    DEFAULT_BETA,
    GENERATIVE,
    MAX_LEVEL,
    MAX_SEED,
    PREFERENCE,
    TrainConfig,
    validate_config,
)
from .data import corrupt, format_completion, format_prompt, make_dataset  # noqa: F401


@dataclass
class TrainResult:
    out: str
    config: dict
    steps: list[dict]
    step_times: list[float]
    elapsed_s: float
    saved: list[str] = field(default_factory=list)
    tracking: list[dict] = field(default_factory=list)
    optimizer_state_bytes: int = 0


# -- loading ------------------------------------------------------------------------------------------
def load_model(path: str, precision: str = "fp32", cls=None, **kwargs):
    """(model, tokenizer, stored dtype) from a local checkpoint folder, never from a hub."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    check_model_folder(path)
    cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    stored = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch."), torch.float32)
    dtype = {"fp32": torch.float32, "mixed": torch.float32, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise InputError(f"--precision: {precision!r} is not fp32, mixed or bf16.")
    cls = cls or AutoModelForCausalLM
    try:
        model = cls.from_pretrained(str(p), dtype=dtype, local_files_only=True, **kwargs)
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # transformers' many ways to refuse a folder
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: transformers cannot load this model or its tokenizer ({first}).") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, stored


# -- configs ------------------------------------------------------------------------------------------
def _common(cfg: TrainConfig, workdir: str) -> dict:
    import torch

    return dict(
        output_dir=workdir, max_steps=cfg.steps, learning_rate=cfg.lr, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0,
        weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=cfg.warmup_ratio, optim="adamw_torch",  # a float below 1 is a share of the steps
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        bf16=cfg.precision == "mixed",  # fp32 master weights, bf16 autocast for every forward (sampling included)
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
        **({"fsdp": True, "fsdp_config": {"version": 2}} if cfg.fsdp else {}),
    )


def _trainer(cfg: TrainConfig, model, tok, data, workdir: str):
    """Build the TRL trainer for ``cfg.algo`` with our (masked) optimizer (built inside the trainer under FSDP2)."""
    trainer = _make_trainer(cfg, model, tok, data, workdir)
    if cfg.fsdp:
        if not trainer.is_fsdp_enabled:  # accelerate 1.15 enables FSDP for accelerators only, not MULTI_CPU
            raise InputError(f"--fsdp: accelerate runs this job as {trainer.accelerator.distributed_type.value}, not FSDP "
                             "(it shards with FSDP on GPUs and other accelerators only); drop --fsdp to train with DDP, "
                             "or shard with torch's fully_shard from Python (see the README).")
        trainer.optimizer_cls_and_kwargs = (_fsdp_factory(cfg, trainer.args), {})
    return trainer


def _make_trainer(cfg: TrainConfig, model, tok, data, workdir: str):
    import torch

    from .masked import build_masked_optimizer

    beta = DEFAULT_BETA[cfg.algo] if cfg.beta is None else cfg.beta
    c = _common(cfg, workdir)
    a = cfg.algo
    gen = dict(num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
               beta=beta, epsilon=cfg.epsilon, generation_batch_size=cfg.batch_size, shuffle_dataset=True)
    if a == "ppo":
        from transformers import AutoModelForSequenceClassification
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        # TRL's PPO scores with a reward *model*: a scalar head on the same backbone (num_labels=1)
        reward, _, _ = load_model(cfg.model, cfg.precision, cls=AutoModelForSequenceClassification, num_labels=1)
        value, _, _ = load_model(cfg.model, cfg.precision, cls=AutoModelForSequenceClassification, num_labels=1)
        for m in (reward, value):
            m.config.pad_token_id = tok.pad_token_id
        c.update(total_episodes=cfg.steps * cfg.batch_size, num_ppo_epochs=1, num_mini_batches=1, response_length=cfg.max_new_tokens,
                 stop_token="eos", kl_coef=beta, cliprange=cfg.epsilon, temperature=cfg.temperature, num_sample_generations=0,
                 local_rollout_forward_batch_size=cfg.batch_size)
        c.pop("max_steps")
        args = PPOConfig(**c)
        both = torch.nn.ModuleDict({"policy": model, "value_model": value})
        opt = build_masked_optimizer(both, args, cfg.mask, cfg.steps, missing="train", sparse_state=cfg.sparse_state, master_dtype=_master(cfg),
                                     mask_order=cfg.mask_order)
        ref, _, _ = load_model(cfg.model, cfg.precision)
        return PPOTrainer(args=args, processing_class=tok, model=model, ref_model=ref, reward_model=reward,
                          train_dataset=data, value_model=value, optimizers=opt)
    if a not in TRAINERS:
        raise InputError(f"--algo: unknown algorithm {a!r} (choose from {', '.join(ALGOS)}).")
    module, config_cls, trainer_cls, extra = TRAINERS[a]
    import importlib

    mod = importlib.import_module(module)
    named = {"gen": gen, "beta": dict(beta=beta), "length": dict(max_length=128)}
    args = getattr(mod, config_cls)(**c, **{k: v for part in extra for k, v in (named[part] if isinstance(part, str) else part).items()})
    more = {"reward_funcs": T.REWARDS[cfg.reward]} if a in GENERATIVE else {}
    return getattr(mod, trainer_cls)(model=model, args=args, train_dataset=data, processing_class=tok, **more, **_optimizers(cfg, model, args))


# algorithm -> (module, config class, trainer class, config parts): "gen" = sampling settings, "beta" = the
# KL / preference strength, "length" = max_length 128, or a dict of fixed settings. PPO is built apart (it
# needs reward, value and reference models).
TRAINERS = {
    "sft": ("trl", "SFTConfig", "SFTTrainer", ("length",)),
    "grpo": ("trl", "GRPOConfig", "GRPOTrainer", ("gen",)),
    "rloo": ("trl", "RLOOConfig", "RLOOTrainer", ("gen",)),
    "dpo": ("trl", "DPOConfig", "DPOTrainer", ("beta", "length")),
    "kto": ("trl", "KTOConfig", "KTOTrainer", ("beta", "length")),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer", ("beta", "length", {"max_completion_length": 64})),
    "simpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer",
              ("beta", "length", {"loss_type": "simpo", "cpo_alpha": 0.0, "max_completion_length": 64})),
}


def _optimizers(cfg: TrainConfig, model, args) -> dict:
    """The trainer's optimizer argument: our (masked) optimizer and schedule, built now from the model's
    parameters; under FSDP2 nothing (the parameters are only sharded inside the trainer, so the optimizer is
    built there by :func:`_fsdp_factory`)."""
    from .masked import build_masked_optimizer

    if cfg.fsdp:
        return {}
    return {"optimizers": build_masked_optimizer(model, args, cfg.mask, cfg.steps, sparse_state=cfg.sparse_state, master_dtype=_master(cfg),
                                                  mask_order=cfg.mask_order)}


def _fsdp_factory(cfg: TrainConfig, args):
    """For transformers' ``optimizer_cls_and_kwargs``: a factory called with the sharded model (DTensor parameters)."""
    from .masked import build_masked_optimizer

    def build(model, **_):
        return build_masked_optimizer(model, args, cfg.mask, None, sparse_state=cfg.sparse_state, master_dtype=_master(cfg),
                                      mask_order=cfg.mask_order)[0]

    return lambda: build


def _master(cfg: TrainConfig):
    import torch

    return torch.float32 if cfg.master_in_mask else None


def optimizer_state_bytes(opt) -> int:
    inner = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    if hasattr(inner, "state_bytes"):
        return inner.state_bytes()  # sparse state: moments and mask positions
    inner = getattr(inner, "optimizer", inner)  # MaskedOptimizer
    tot = 0
    for st in inner.state.values():
        for v in st.values():
            if hasattr(v, "element_size"):
                tot += v.numel() * v.element_size()
    return tot


_CHECKED: set[str] = set()  # content keys of model folders already checked in this process


def check_model_folder(path: str) -> None:
    """The model folder must be a local checkpoint rlsubnet can read safely (no unsafe pickles) with a usable
    config that describes the weights the folder holds."""
    from ..io.checkpoint import open_checkpoint
    from ..io.content import content_key

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{path}: --model must be a local Hugging Face checkpoint folder.")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{path}: not a Hugging Face checkpoint folder (no config.json).")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{cfg_path}: not valid JSON.") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise InputError(f"{cfg_path}: has no 'model_type', so transformers cannot tell which model it is.")
    with open_checkpoint(path) as ck:  # validates every weight file (safe unpickling, headers, index)
        shapes = {n: tuple(t.shape) for n, t in ck.tensors.items()}
    key = content_key(path)
    if key not in _CHECKED:
        check_config_matches_weights(cfg_path, shapes)
        _CHECKED.add(key)


def check_config_matches_weights(cfg_path: Path, shapes: dict[str, tuple]) -> None:
    """The model ``config.json`` describes must be the model the weight files hold, checked on the meta device
    (no memory spent) before transformers builds it: ``{"model_type": "llama"}`` beside 16 KB of weights
    would otherwise build the 6.7B default first. A parameter stored under its own name must have the shape
    the config gives it, and the config may not describe more parameters than the files hold (a tied output
    head counts once; names transformers converts on load, such as per-expert MoE tensors, are compared by
    size), so nothing the weights do not hold is allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(cfg_path.parent), local_files_only=True)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, ImportError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{cfg_path}: transformers cannot build the model it describes ({first}).") from None
    stored = dict(shapes)
    for n, shp in shapes.items():  # checkpoints saved without the base model's prefix
        stored.setdefault(f"{meta.base_model_prefix}.{n}", shp)
    params = list(meta.named_parameters())  # tied parameters (the output head) appear once
    del meta
    held = sum(_numel(s) for s in shapes.values())
    described = sum(p.numel() for _, p in params)
    for name, p in params:
        shp = stored.get(name)
        if shp is not None and tuple(shp) != tuple(p.shape):
            raise InputError(f"{cfg_path}: describes parameter '{name}' as {list(p.shape)}, the weight files hold {list(shp)}; "
                             "this config.json does not belong to these weights.")
    if described > held:  # names may differ (transformers renames some layouts on load), sizes may not
        missing = next((n for n, _ in params if n not in stored), None)
        raise InputError(f"{cfg_path}: describes {described:,} parameters, the weight files hold {held:,}"
                         + (f" (no '{missing}' among them)" if missing else "") + "; this config.json does not belong to these weights.")


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _nonfinite_params(model) -> str | None:
    import torch

    for name, p in model.named_parameters():
        if not torch.isfinite(p.detach()).all():
            return name
    return None


def _distributed():
    """(rank, world size, accelerate's PartialState or None) of a run started by torchrun / accelerate launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    st = PartialState(cpu=not torch.cuda.is_available())  # joins the process group (gloo on CPU) once, shared with the trainer
    return st.process_index, st.num_processes, st


def run_training(cfg: TrainConfig, progress: bool = True, label: str | None = None) -> TrainResult:
    """Train, then write ``cfg.out`` (checkpoint in the input dtype + ``train_log.json``) atomically.

    ``cfg.out`` is replaced only if it does not exist, is an empty folder, or was written by rlsubnet
    (it holds :data:`rlsubnet.io.guard.MARKER`); it may not be, hold or lie inside the model or the mask.
    The run trains in a private work folder next to ``cfg.out`` and swaps it into place in one step.

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) every process trains (DDP, or FSDP2 with
    ``cfg.fsdp``; ``cfg.batch_size`` is per process) and only the main process writes; the others write nothing.
    """
    validate_config(cfg)  # options first: a refused run answers before torch is imported
    need("torch", "transformers", "trl", "accelerate", "datasets", what="training")
    out = _check_inputs(cfg)
    run = _claim_output(cfg, out)
    try:
        trainer, model, tok, stored, callbacks = _build(cfg, run, progress, label or f"{cfg.algo} {out.name}")
        t0 = time.perf_counter()
        trainer.train()
        res = _result(cfg, run, trainer, model, callbacks, time.perf_counter() - t0)
        full = _full_state(model) if cfg.fsdp else None  # a collective: every process takes part
        if run.main:
            _finish(cfg, run, model, tok, stored, res, callbacks, full)
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    if run.state is not None:
        run.state.wait_for_everyone()  # no process reports success before the output is in place
    return res


@dataclass
class _Run:
    """Where a run writes: ``out``, this process's work folder, and its place among the processes."""

    out: Path
    work: Path
    rank: int
    world: int
    state: object  # accelerate's PartialState under torchrun, else None

    @property
    def main(self) -> bool:
        return self.rank == 0


def _check_inputs(cfg: TrainConfig) -> Path:
    """The mask exists, the output may be written, and the model folder is what its config says."""
    from ..io.guard import check_outputs, check_replaceable

    if cfg.mask and not os.path.isfile(cfg.mask):
        raise InputError(f"{cfg.mask}: no such mask file.")
    out = Path(os.path.abspath(os.path.expanduser(cfg.out)))
    check_outputs({"--out": out}, [cfg.model, cfg.mask], folder_outputs=["--out"])
    check_replaceable(out)
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise InputError("fsdp: shards over several processes; start the run with torchrun or accelerate launch.")
    check_model_folder(cfg.model)  # the config against the weights, on the meta device, before anything is allocated
    return out


def _claim_output(cfg: TrainConfig, out: Path) -> _Run:
    """Join the process group (if any); the main process claims a work folder next to ``out``, the others a
    private scratch folder they never fill."""
    import tempfile

    from ..io.atomic import clean_stale, live_writer, temp_name

    rank, world, state = _distributed()
    if rank == 0:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{out}: cannot create the output's parent folder ({e.strerror}).") from None
        clean_stale(out.parent, out.name)
        other = live_writer(out)
        if other:
            raise InputError(f"{out}: another rlsubnet train (pid {other}) is writing this folder; wait for it or choose another --out.")
        work = temp_name(out, "work")
        work.mkdir()
    else:
        work = Path(tempfile.mkdtemp(prefix="rlsubnet-rank"))
    return _Run(out, work, rank, world, state)


def _build(cfg: TrainConfig, run: _Run, progress: bool, label: str):
    """(trainer, model, tokenizer, stored dtype, callbacks): the model, its data and the TRL trainer with our
    (masked) optimizer, and the callbacks that log, save, track and show progress."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from .tracking import SaveEvery, SparsityTracker, StepProgress, TrainLog

    hf_logging.disable_progress_bar()
    set_seed(cfg.seed)
    model, tok, stored = load_model(cfg.model, cfg.precision)
    trainer = _trainer(cfg, model, tok, make_dataset(cfg, tok), str(run.work / "trainer"))
    trainer.remove_callback(PrinterCallback)  # logs go to train_log.json; the progress bar shows steps
    cb = {"log": TrainLog(),
          "saver": SaveEvery(run.work / "intermediate", cfg.save_every, stored, tok, model=model) if cfg.save_every and run.main else None,
          "tracker": SparsityTracker(cfg.model, cfg.track_every, model=model) if cfg.track_every and run.main else None,
          "progress": StepProgress(label, cfg.steps) if progress and run.main else None}
    for c in cb.values():
        if c is not None:
            trainer.add_callback(c)
    return trainer, model, tok, stored, cb


def _result(cfg: TrainConfig, run: _Run, trainer, model, cb: dict, elapsed: float) -> TrainResult:
    bad = _nonfinite_params(model)
    if bad:
        raise InputError(f"{cfg.model}: training diverged (parameter '{bad}' is not finite; check the learning rate, beta "
                         f"and weight decay); nothing was written to {cfg.out}.")
    saver, tracker, log = cb["saver"], cb["tracker"], cb["log"]
    return TrainResult(str(cfg.out), {**dataclasses.asdict(cfg), "key": cfg.key(), "world_size": run.world}, log.steps,
                       log.step_times, elapsed, [str(run.out / Path(s).name) for s in saver.saved] if saver else [],
                       tracker.records if tracker else [], optimizer_state_bytes(trainer.optimizer))


def _finish(cfg: TrainConfig, run: _Run, model, tok, stored, res: TrainResult, cb: dict, full: dict | None) -> None:
    """Write the checkpoint (and its fp32 copy, intermediate steps, log and marker) into the work folder and
    swap it into place, checked again at the swap: something may have appeared at ``out`` meanwhile."""
    import torch

    from ..io.atomic import record_written, replace_dir
    from ..io.guard import write_marker
    from .checkpoints import save_as
    from .tracking import write_log

    final = run.work / "final"
    save_as(model, final, stored, tok, state_dict=full)
    if cfg.fp32_copy:
        save_as(model, final / "fp32", torch.float32, tok, state_dict=full)
    write_log(final / "train_log.json", dataclasses.asdict(res))
    if cb["tracker"] is not None and cb["tracker"].records:
        (final / "tracking").mkdir(exist_ok=True)  # the union over tracked steps, as a mask
        cb["tracker"].ever_mask().save(final / "tracking" / "ever_changed.safetensors")
    for s in cb["saver"].saved if cb["saver"] else []:
        os.replace(s, final / Path(s).name)
    write_marker(final, "train", algo=cfg.algo, model=str(cfg.model))
    replace_dir(final, run.out, guard="--out")
    record_written(run.out)


def _full_state(model) -> dict:
    """Full (unsharded) tensors of an FSDP2 model's state dict; every process must call it."""
    out = {}
    for name, t in model.state_dict().items():
        out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out
