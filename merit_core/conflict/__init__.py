"""Calibration gradients, sketches and the conflict matrix (MERIT spec step 1).

For every source t, the mean SFT gradient g_t at θ(0) over a calibration sample,
reduced to a sketch of fixed size, then C_ij = <g_i/||g_i||, g_j/||g_j||> (cosine; the
raw Gram matrix is an ablation). One module per part:

- :mod:`merit_core.conflict.gradient`: which parameters count
  (:func:`trainable_parameters`) and the sketched mean gradient of one source
  (:func:`source_gradient`);
- :mod:`merit_core.conflict.sketch`: the sketchers (:class:`CountSketch`,
  :class:`StrideSketch`, :class:`FullSketch`) and :func:`make_sketcher`;
- :mod:`merit_core.conflict.matrix`: the conflict matrix C (:func:`conflict_matrix`).
"""

from merit_core.conflict.gradient import VISION_NAME_PARTS, source_gradient, trainable_parameters
from merit_core.conflict.matrix import conflict_matrix
from merit_core.conflict.sketch import CountSketch, FullSketch, Sketcher, StrideSketch, make_sketcher

__all__ = [
    "VISION_NAME_PARTS",
    "CountSketch",
    "FullSketch",
    "Sketcher",
    "StrideSketch",
    "conflict_matrix",
    "make_sketcher",
    "source_gradient",
    "trainable_parameters",
]
