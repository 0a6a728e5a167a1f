"""One training branch: a transformers ``Trainer`` run from θ(0) on the union of a
group's sources (MERIT spec step 4, Algorithm 1 line "fine-tune θ_k from θ(0)").

Every branch uses the same hyper-parameters (TrainConfig), full fine-tuning with AdamW,
no communication with other branches. Checkpoints (model, optimizer, scheduler, RNG
state, step) are written every ``save_steps`` optimizer steps by the Trainer; a restarted
branch resumes from the newest complete checkpoint with the same data order, so the
result does not depend on whether it was interrupted.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from merit_core.config import TrainConfig
from merit_core.data.types import TokenizedExample
from merit_core.batching import PackedCollator, packing_supported
from merit_core.precision import resolve_bf16

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


class TrainError(RuntimeError):
    """A branch cannot train (bad input or an unsupported setting); names the cause."""


class TrainSetupError(TrainError):
    """A setting this machine cannot run (DeepSpeed without CUDA, a missing DeepSpeed
    config, a batch the process count does not divide, no examples): retrying the
    branch cannot help, so the pipeline does not retry it."""


@dataclass
class BranchResult:
    """What one finished branch reports (small; travels between pipeline stages).

    Attributes:
        output_dir: HF model directory of θ_k (safetensors, config, tokenizer).
        trained_tokens: N_k, loss-bearing (response) tokens processed in training,
            counted with multiplicity over epochs (the token-weighted merge weight).
        examples: training examples in the branch (one epoch).
        steps: optimizer steps taken.
        train_loss: mean training loss reported by the Trainer (nats/token).
        wall_s: wall time of training in seconds.
        resumed_from_step: step of the checkpoint the run resumed from (0 if none).
        processes: processes that trained the branch together (torchrun world size).
        packed: whether the branch trained on padding-free packed batches.
        real_token_fraction: example tokens / all positions of the batches this
            process trained on (1.0 minus the share spent on padding).
    """

    output_dir: str
    trained_tokens: int
    examples: int
    steps: int
    train_loss: float
    wall_s: float
    resumed_from_step: int = 0
    processes: int = 1
    packed: bool = False
    real_token_fraction: float = math.nan

    def to_dict(self) -> dict:
        return asdict(self)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[TokenizedExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}


class _CountingCollator:
    """A padded-batch collator that counts example tokens and padded positions (the
    ``real_token_fraction`` of a branch trained without packing)."""

    def __init__(self, collate: Callable[[list[dict]], dict]):
        self._collate = collate
        self.real_positions = 0
        self.total_positions = 0

    def __call__(self, features: list[dict]) -> dict:
        batch = self._collate(features)
        self.real_positions += sum(len(f["input_ids"]) for f in features)
        self.total_positions += int(batch["input_ids"].numel())
        return batch

    @property
    def real_token_fraction(self) -> float:
        return self.real_positions / self.total_positions if self.total_positions else math.nan


def trained_token_count(examples: Sequence[TokenizedExample], cfg: TrainConfig) -> int:
    """N_k: loss-bearing tokens the branch trains on (spec step 5, choice: non-padding
    tokens that carry loss), counted once per epoch.

    With ``max_steps > 0`` the count is scaled to the examples the steps cover
    (steps × batch × accumulation, cycling over epochs).
    """
    per_epoch = sum(e.n_loss_tokens for e in examples)
    if cfg.max_steps and cfg.max_steps > 0:
        seen = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps
        return int(round(per_epoch * seen / max(1, len(examples))))
    return int(round(per_epoch * cfg.epochs))


def newest_checkpoint(checkpoint_root: str | os.PathLike) -> Path | None:
    """The ``checkpoint-<step>`` dir with the largest step that the Trainer finished
    writing (it has ``trainer_state.json``), or None."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file():
            try:
                found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return max(found)[1] if found else None


def world_size() -> int:
    """Processes training this branch together (``WORLD_SIZE`` set by torchrun; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_train_setup(cfg: TrainConfig, nproc: int = 1) -> None:
    """Fail fast on settings this machine cannot train with, before any work.

    The flow calls this when it starts (for branches that run on this machine), and
    every branch again before training.

    Raises:
        TrainSetupError: DeepSpeed without CUDA, a missing DeepSpeed config file, or
            ``cfg.batch_size`` not divisible by ``nproc`` processes.
    """
    _check_deepspeed(cfg)
    if cfg.batch_size % nproc:
        raise TrainSetupError(f"train.batch_size={cfg.batch_size} is not divisible by the {nproc} processes "
                              f"of a branch (train.nproc_per_node={cfg.nproc_per_node!r})")


def _check_deepspeed(cfg: TrainConfig) -> None:
    if cfg.deepspeed and not torch.cuda.is_available():
        raise TrainSetupError(
            f"train.deepspeed={cfg.deepspeed!r} needs CUDA GPUs, but torch sees none on this machine; "
            "unset train.deepspeed to train on CPU"
        )
    if cfg.deepspeed and not Path(cfg.deepspeed).is_file():
        raise TrainSetupError(f"train.deepspeed: DeepSpeed config file {cfg.deepspeed} does not exist")


def train_branch(
    base_dir: str | os.PathLike,
    examples: Sequence[TokenizedExample],
    output_dir: str | os.PathLike,
    cfg: TrainConfig,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    dtype: str = "float32",
    on_checkpoint: Callable[[Path], None] | None = None,
    callbacks: Sequence[object] = (),
) -> BranchResult:
    """Fine-tune a copy of θ(0) on ``examples`` and save θ_k to ``output_dir``.

    Args:
        base_dir: HF directory of θ(0) (safetensors + tokenizer).
        examples: the union of the group's training examples (any order; the Trainer
            shuffles with ``cfg.seed``).
        output_dir: where the final HF directory is written (model + tokenizer).
        cfg: hyper-parameters, identical for every branch.
        checkpoint_dir: where ``checkpoint-<step>`` dirs go (default
            ``<output_dir>/../<name>-checkpoints``); a restart with ``resume=True``
            continues from the newest complete one.
        dtype: weights dtype for training (``float32`` on CPU).
        on_checkpoint: called with each checkpoint dir after the Trainer wrote it
            (the pipeline uploads it to the object store); on rank 0 only.
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. the throughput
            benchmark's step timer); the batch collator is ``train_dataloader.collate_fn``.

    Under torchrun (``WORLD_SIZE`` > 1, see :mod:`merit_core.launch`) every rank calls
    this; each takes ``cfg.batch_size / WORLD_SIZE`` examples per micro-step, so the
    global batch and the step count do not depend on the process count. Rank 0 writes
    ``output_dir``; other ranks return the same BranchResult without writing it.

    Returns:
        BranchResult with N_k (``trained_tokens``) for the token-weighted merge.

    Raises:
        TrainError: no examples, DeepSpeed without CUDA, missing DeepSpeed config,
            ``cfg.batch_size`` not divisible by the process count.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    if not examples:
        raise TrainSetupError("train_branch: the branch has no training examples")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    output_dir = Path(output_dir)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else output_dir.parent / f"{output_dir.name}-checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype, trust_remote_code=False)
    use_cache = model.config.use_cache
    # Training needs no KV cache; without one transformers also reads packed examples'
    # boundaries from position_ids. Restored before the model is saved.
    model.config.use_cache = False
    packed = cfg.packing and packing_supported(model)
    if cfg.packing and not packed:
        logger.warning("train.packing: %s does not keep packed examples apart (position_ids without an "
                       "attention mask); this branch trains on padded batches", type(model).__name__)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    use_cuda = torch.cuda.is_available()
    world = world_size()
    check_train_setup(cfg, world)
    bf16 = resolve_bf16(cfg.bf16, "cuda" if use_cuda else "cpu", "train.bf16")
    args = TrainingArguments(
        output_dir=str(ckpt_root),
        per_device_train_batch_size=cfg.batch_size // world,  # same global batch on any process count
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        optim="adamw_torch",
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to="none",
        use_cpu=not use_cuda,
        bf16=bf16,
        deepspeed=cfg.deepspeed,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    if packed:
        collator = PackedCollator(tokenizer.pad_token_id, cfg.pack_tokens)
    else:
        collator = _CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))

    callbacks = list(callbacks)
    if on_checkpoint is not None:

        class _Upload(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):  # noqa: D401 - HF signature
                if not state.is_world_process_zero:
                    return
                path = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
                if path.is_dir():
                    on_checkpoint(path)

        callbacks.append(_Upload())

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_ListDataset(examples),
        data_collator=collator,
        callbacks=callbacks,
    )
    resume_from = newest_checkpoint(ckpt_root) if resume else None
    resumed_step = int(resume_from.name[len(CHECKPOINT_PREFIX):]) if resume_from else 0
    if resume_from:
        logger.info("resuming branch from %s (step %d)", resume_from, resumed_step)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - t0

    model.config.use_cache = use_cache
    tmp = output_dir.with_name(output_dir.name + ".partial")
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))  # every rank (ZeRO-3 gathers the 16-bit weights); rank 0 writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(tmp))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)

    loss = float(out.training_loss) if out.training_loss is not None else math.nan
    return BranchResult(
        output_dir=str(output_dir),
        trained_tokens=trained_token_count(examples, cfg),
        examples=len(examples),
        steps=int(trainer.state.global_step),
        train_loss=loss,
        wall_s=wall,
        resumed_from_step=resumed_step,
        processes=world,
        packed=packed,
        real_token_fraction=collator.real_token_fraction,
    )
