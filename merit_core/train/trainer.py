"""One training branch: a transformers ``Trainer`` run from θ(0) on the union of a
group's sources (MERIT spec step 4, Algorithm 1 line "fine-tune θ_k from θ(0)").

Every branch uses the same hyper-parameters (TrainConfig), full fine-tuning with AdamW,
no communication with other branches. Checkpoints (model, optimizer, scheduler, RNG
state, step, loss so far) are written every ``save_steps`` optimizer steps by the Trainer;
a restarted branch resumes from the newest complete checkpoint with the same data order
in every epoch (:mod:`merit_core.train.resumable`), so the weights and the reported loss
do not depend on whether it was interrupted.

Image-instruction examples (``image_inputs`` set) train on padded batches carrying their
image inputs (never packed); a vision-language θ(0) loads with
``AutoModelForImageTextToText`` and its processor files are saved with θ_k.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from merit_core.batching import PackedCollator, packing_supported
from merit_core.config import TrainConfig
from merit_core.data.types import TokenizedExample
from merit_core.precision import resolve_bf16
from merit_core.refs import TrainStats
from merit_core.train.checks import TrainSetupError, check_train_setup
from merit_core.train.progress import ProgressHook, progress_callback

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_PROCESSOR_SIDE_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja",
                         "chat_template.json")
"""θ(0)'s processor files, copied unchanged into θ_k (training does not change them)."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[TokenizedExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        item = {"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
        if e.image_inputs:
            item["image_inputs"] = e.image_inputs
        return item


class _ImageCollator:
    """Padded batches of image-instruction examples: the text part through ``collate``
    (``DataCollatorForSeq2Seq``), plus the examples' image inputs
    (:func:`merit_core.data.images.image_batch`, per-token fields aligned with the
    tokenizer's padding side)."""

    def __init__(self, collate: Callable[[list[dict]], dict], padding_side: str):
        self._collate = collate
        self._left = padding_side == "left"

    def __call__(self, features: list[dict]) -> dict:
        from merit_core.data.images import image_batch

        paths = [f.get("image_inputs") for f in features]
        batch = self._collate([{k: v for k, v in f.items() if k != "image_inputs"} for f in features])
        length = int(batch["input_ids"].shape[1])
        offsets = [length - len(f["input_ids"]) if self._left else 0 for f in features]
        batch.update(image_batch(paths, length, offsets))
        return batch


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
        return round(per_epoch * seen / max(1, len(examples)))
    return round(per_epoch * cfg.epochs)


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


def planned_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps a branch of ``n_examples`` examples will make: ``max_steps`` when set,
    else ceil(epochs × ceil(ceil(n / batch_size) / gradient_accumulation_steps)), as the
    Trainer counts them (``batch_size`` is the global batch; packing keeps it)."""
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.gradient_accumulation_steps)
    return math.ceil(cfg.epochs * per_epoch)


def world_size() -> int:
    """Processes training this branch together (``WORLD_SIZE`` set by torchrun; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_branch(base_dir: str | os.PathLike, examples: Sequence[TokenizedExample], output_dir: str | os.PathLike,
                 cfg: TrainConfig, *, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
                 dtype: str = "float32", on_checkpoint: Callable[[Path], None] | None = None,
                 callbacks: Sequence[object] = (), on_progress: ProgressHook | None = None,
                 trust_remote_code: bool = False, trainable: str | list[str] = "all") -> TrainStats:
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
        trust_remote_code: run model code shipped with θ(0) (``model.trust_remote_code``).
        on_checkpoint: called with each checkpoint dir after the Trainer wrote it
            (the pipeline uploads it to the object store); on rank 0 only.
        callbacks: extra ``transformers.TrainerCallback`` objects (the throughput benchmark's step timer).
        on_progress: called on rank 0 with each Trainer log, a :class:`~merit_core.train.progress.TrainProgress`
            (also logged as one INFO line on ``merit_core.train.progress``).
        trainable: ``model.trainable``; every other parameter is frozen (:func:`_freeze`).

    Under torchrun (``WORLD_SIZE`` > 1, see :mod:`merit_core.train.launch`) every rank calls this; each takes
    ``cfg.batch_size / WORLD_SIZE`` examples per micro-step, so the global batch and the step count do not depend
    on the process count. Rank 0 writes ``output_dir``; other ranks return the same stats without writing it.

    Returns:
        TrainStats with N_k (``trained_tokens``) for the token-weighted merge.

    Raises:
        TrainSetupError: no examples, DeepSpeed without CUDA, missing DeepSpeed config,
            ``cfg.batch_size`` not divisible by the process count.
    """
    from merit_core.train.resumable import ResumableTrainer

    if not examples:
        raise TrainSetupError("train_branch: the branch has no training examples")
    output_dir, ckpt_root = _output_dirs(output_dir, checkpoint_dir)
    images = _has_images(examples)
    tokenizer, model, packed, use_cache, counts = _load(base_dir, cfg, dtype, trainable, not images, trust_remote_code)
    world = world_size()
    check_train_setup(cfg, world)
    collator = _collator(tokenizer, cfg, packed, images)
    trainer = ResumableTrainer(model=model, args=_training_arguments(cfg, ckpt_root, world),
                      train_dataset=_ListDataset(examples), data_collator=collator,
                      callbacks=[*callbacks, *_upload_callbacks(on_checkpoint), progress_callback(on_progress)])
    resume_from, resumed_step = _resume_point(ckpt_root) if resume else (None, 0)
    started_at, t0 = time.time(), time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)  # exact at any step
    wall = time.perf_counter() - t0
    model.config.use_cache = use_cache  # switched off for training by _load
    _save(trainer, tokenizer, output_dir, base_dir)
    real = collator.real_token_fraction
    return TrainStats(trained_tokens=trained_token_count(examples, cfg), examples=len(examples), wall_s=wall,
                      steps=int(trainer.state.global_step), started_at=started_at, resumed_from_step=resumed_step,
                      train_loss=float(out.training_loss) if out.training_loss is not None else math.nan,
                      processes=world, packed=packed, real_token_fraction=None if math.isnan(real) else real, **counts)


def _has_images(examples: Sequence[TokenizedExample]) -> bool:
    """Whether the branch has image-instruction examples (padded batches, never packed)."""
    return any(e.image_inputs for e in examples)


def _freeze(model: torch.nn.Module, trainable: str | list[str]) -> dict[str, int]:
    """``requires_grad`` on exactly the ``trainable`` parameters
    (:func:`merit_core.conflict.gradient.trainable_parameters`); the others are not in
    the optimizer, so they leave the branch bit-identical to θ(0) (``"lm"`` freezes a
    vision-language model's vision tower and projector, as in the paper). Returns the
    counts as TrainStats fields (:func:`merit_core.vlm.parameter_counts`)."""
    from merit_core.conflict.gradient import trainable_parameters
    from merit_core.vlm import parameter_counts

    selected = {id(p) for _, p in trainable_parameters(model, trainable)}
    for p in model.parameters():
        p.requires_grad_(id(p) in selected)
    counts = parameter_counts(model, trainable)
    if counts["frozen"]:
        logger.info("model.trainable=%r: %d trainable, %d frozen parameters", trainable, counts["trainable"],
                    counts["frozen"])
    return {"trainable_parameters": counts["trainable"], "frozen_parameters": counts["frozen"]}


def _output_dirs(output_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    """``output_dir`` and the checkpoint root (created; default ``<output_dir>-checkpoints``)."""
    output_dir = Path(output_dir)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else output_dir.parent / f"{output_dir.name}-checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    return output_dir, ckpt_root


def _resume_point(ckpt_root: Path) -> tuple[Path | None, int]:
    """The newest complete checkpoint under ``ckpt_root`` and its step, or (None, 0)."""
    resume_from = newest_checkpoint(ckpt_root)
    if resume_from is None:
        return None, 0
    step = int(resume_from.name[len(CHECKPOINT_PREFIX):])
    logger.info("resuming branch from %s (step %d)", resume_from, step)
    return resume_from, step


def _load(base_dir: str | os.PathLike, cfg: TrainConfig, dtype: str, trainable: str | list[str] = "all",
          allow_packing: bool = True, trust_remote_code: bool = False) -> tuple:
    """θ(0) with its KV cache switched off and only ``trainable`` parameters trainable
    (:func:`_freeze`), on ``cfg.threads`` torch threads; its tokenizer (pad token = EOS
    when it has none), whether the branch trains packed (``cfg.packing``,
    ``allow_packing`` (no image examples) and the model keeps packed examples apart),
    the model's own ``use_cache`` (restored before saving), and the parameter counts.
    ``trust_remote_code`` runs model code shipped with θ(0) (``model.trust_remote_code``)."""
    from transformers import AutoTokenizer

    from merit_core.vlm import auto_model_class

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = auto_model_class(base_dir).from_pretrained(base_dir, dtype=_DTYPES[dtype],
                                                       trust_remote_code=trust_remote_code)
    text_config = model.config.get_text_config()
    use_cache = model.config.use_cache if hasattr(model.config, "use_cache") else text_config.use_cache
    # Training needs no KV cache; without one transformers also reads packed examples'
    # boundaries from position_ids.
    model.config.use_cache = False
    text_config.use_cache = False
    packed = cfg.packing and allow_packing and packing_supported(model)
    if cfg.packing and not allow_packing:
        logger.info("train.packing: image-instruction examples train on padded batches")
    elif cfg.packing and not packed:
        logger.warning("train.packing: %s does not keep packed examples apart (position_ids without an "
                       "attention mask); this branch trains on padded batches", type(model).__name__)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return tokenizer, model, packed, use_cache, _freeze(model, trainable)


def _training_arguments(cfg: TrainConfig, ckpt_root: Path, world: int):
    """The Trainer's arguments for ``cfg`` on ``world`` processes (same global batch on
    any process count)."""
    from transformers import TrainingArguments

    use_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(ckpt_root),
        per_device_train_batch_size=cfg.batch_size // world,
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
        bf16=resolve_bf16(cfg.bf16, "cuda" if use_cuda else "cpu", "train.bf16"),
        deepspeed=cfg.deepspeed,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def _collator(tokenizer, cfg: TrainConfig, packed: bool, images: bool = False) -> PackedCollator | _CountingCollator:
    """Packed rows (text, ``packed``), or padded batches, with the examples' image inputs
    when the branch has image-instruction examples (:class:`_ImageCollator`)."""
    from transformers import DataCollatorForSeq2Seq

    if packed:
        return PackedCollator(tokenizer.pad_token_id, cfg.pack_tokens)
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return _CountingCollator(_ImageCollator(pad, tokenizer.padding_side) if images else pad)


def _upload_callbacks(on_checkpoint: Callable[[Path], None] | None) -> list:
    """A Trainer callback that hands each checkpoint dir rank 0 saved to ``on_checkpoint``."""
    from transformers import TrainerCallback

    if on_checkpoint is None:
        return []

    class _Upload(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            path = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if path.is_dir():
                on_checkpoint(path)

    return [_Upload()]


def _save(trainer, tokenizer, output_dir: Path, base_dir: str | os.PathLike | None = None) -> None:
    """Write θ_k and the tokenizer (and θ(0)'s processor files, for a vision-language
    model) to ``output_dir`` (through ``<name>.partial``, so a crash never leaves a
    half-written directory under the final name)."""
    tmp = output_dir.with_name(output_dir.name + ".partial")
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))  # every rank (ZeRO-3 gathers the 16-bit weights); rank 0 writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(tmp))
        for name in _PROCESSOR_SIDE_FILES:
            if base_dir is not None and (Path(base_dir) / name).is_file():
                shutil.copy2(Path(base_dir) / name, tmp / name)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
