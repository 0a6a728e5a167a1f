"""A transformers ``Trainer`` whose resume is bit-exact at any step, and whose reported
train loss covers the whole run (issue 15, point 3).

Two things the stock Trainer (transformers 5.x) does not keep across a restart:

- **The length-grouped data order.** ``LengthGroupedSampler`` without a generator draws
  each epoch's permutation from torch's global RNG *when the epoch starts*. A branch
  resumed in epoch e ≥ 1 starts from the seeded RNG, not from the state the RNG had
  after e epochs of training, so it sees a different order than an uninterrupted run.
  :class:`SeededLengthGroupedSampler` draws epoch e's order from a generator seeded with
  ``seed + e`` (what accelerate's ``SeedableRandomSampler`` does for random sampling), so
  the order depends on the epoch only; the Trainer's ``set_epoch`` and accelerate's
  ``skip_first_batches`` then replay the resumed epoch exactly.
- **The loss of the steps before the checkpoint.** ``train()`` reports the mean loss of
  the steps *it* ran. The running loss sum is saved with every checkpoint as the
  exportable state of :class:`LossSoFar` (``trainer_state.json`` → ``stateful_callbacks``)
  and added back on resume, so ``training_loss`` is the mean over all steps.
"""

from __future__ import annotations

import logging

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import TrainOutput

logger = logging.getLogger(__name__)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped sampling (``group_by_length``) whose order in epoch ``e`` depends
    only on ``seed + e``: indices of similar length batched together, batches shuffled.

    Args:
        batch_size: examples per optimizer step on one process (micro-batch ×
            gradient accumulation), as the Trainer passes it.
        lengths: token length of each example (len = dataset size).
        seed: ``TrainingArguments.data_seed`` (else ``seed``).
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order (called by the Trainer/accelerate each epoch)."""
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


class LossSoFar(TrainerCallback, ExportableState):
    """The sum of the per-step training losses up to the last checkpoint, saved in each
    checkpoint's ``trainer_state.json`` (``stateful_callbacks.LossSoFar``)."""

    def __init__(self, loss_sum: float = 0.0):
        self.loss_sum = loss_sum

    def state(self) -> dict:
        return {"args": {}, "attributes": {"loss_sum": self.loss_sum}}


class ResumableTrainer(Trainer):
    """``transformers.Trainer`` with a seeded length-grouped sampler and a whole-run train
    loss (module docstring). Used exactly like ``Trainer``; it adds a :class:`LossSoFar`
    callback itself."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_so_far = LossSoFar()
        self.add_callback(self._loss_so_far)
        self._prior_loss_sum = 0.0  # loss sum of the steps before the checkpoint resumed from
        self._run_loss_sum: float | None = None

    # -- data order ------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        self._train_sampler = sampler
        return sampler

    def _run_epoch(self, *args, **kwargs):
        # accelerate forwards set_epoch to the sampler too; setting it here also covers a
        # resumed epoch's skip_first_batches loader, whatever wrapper it uses.
        sampler = getattr(self, "_train_sampler", None)
        if hasattr(sampler, "set_epoch") and "epoch" in kwargs:
            sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    # -- whole-run loss --------------------------------------------------------------

    def _init_training_state(self, *args, **kwargs):
        out = super()._init_training_state(*args, **kwargs)
        stored = self.state.stateful_callbacks.get(LossSoFar.__name__)
        self._prior_loss_sum = 0.0
        if self.state.global_step > 0:  # resumed
            if isinstance(stored, dict) and "loss_sum" in stored.get("attributes", {}):
                self._prior_loss_sum = float(stored["attributes"]["loss_sum"])
            else:
                logger.warning("checkpoint at step %d has no loss sum (written by an older merit); the reported "
                               "train loss covers the resumed steps only", self.state.global_step)
        self.state.stateful_callbacks[LossSoFar.__name__] = self._loss_so_far.state()
        return out

    def _save_checkpoint(self, model, trial):
        # the loss logged so far this call, plus what accumulated since the last log
        self._loss_so_far.loss_sum = self._prior_loss_sum + self._total_loss_scalar + self._tr_loss.item()
        return super()._save_checkpoint(model, trial)

    def _finalize_training(self, *args, **kwargs):
        self._run_loss_sum = self._prior_loss_sum + self._total_loss_scalar + self._tr_loss.item()
        return super()._finalize_training(*args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "train_loss" in logs and self._run_loss_sum is not None and self.state.global_step > 0:
            logs = {**logs, "train_loss": self._run_loss_sum / self.state.global_step}
        return super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs) -> TrainOutput:
        """``Trainer.train``; ``training_loss`` is the mean loss over every optimizer step
        of the run, those before the checkpoint it resumed from included."""
        out = super().train(*args, **kwargs)
        if self._run_loss_sum is None or self.state.global_step == 0:
            return out
        loss = self._run_loss_sum / self.state.global_step
        return TrainOutput(out.global_step, loss, {**out.metrics, "train_loss": loss})
