"""bf16 mixed precision: float32 weights, matrix products in bfloat16 under ``torch.autocast``.

Used by the calibration gradients (``conflict.bf16``), training (``train.bf16``, through
the Trainer) and evaluation (``eval.bf16``). On CUDA this is the usual AMP; on a CPU
with native bf16 instructions (AVX512-BF16 or AMX, as oneDNN reports them) the
forward+backward pass of SmolLM2-135M runs about 2× faster and inference about 3×
faster than float32. On a CPU without them autocast would emulate bf16 and be slower
than float32, so bf16 is turned off there with a warning.
"""

import contextlib
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively.

    CUDA: ``torch.cuda.is_bf16_supported()``; CPU: oneDNN's check for AVX512-BF16/AMX.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without the oneDNN op
            return False
    return False


def resolve_bf16(requested: bool, device: str | torch.device, setting: str) -> bool:
    """``requested`` if the device supports bf16; otherwise False and a warning naming
    the config ``setting`` (e.g. ``"train.bf16"``) that asked for it."""
    if not requested:
        return False
    if bf16_supported(device):
        return True
    logger.warning("%s: %s has no native bf16 support; running in float32 instead", setting, torch.device(device))
    return False


@contextlib.contextmanager
def bf16_autocast(device: str | torch.device, enabled: bool) -> Iterator[None]:
    """``torch.autocast(device.type, dtype=torch.bfloat16)`` when ``enabled``, else nothing.

    Weights and optimizer state stay in their own dtype; autocast casts the inputs of
    matrix products to bf16. Losses in merit are computed in float32 on top
    (:func:`merit_core.batching.response_loss_sum` casts the logits).
    """
    if not enabled:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``: where the stages put the
    model for calibration gradients and evaluation."""
    return "cuda" if torch.cuda.is_available() else "cpu"
