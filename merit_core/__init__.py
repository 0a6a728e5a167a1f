"""merit_core: the MERIT method (arXiv 2606.01717) as a Prefect-free library.

Modules: ``config`` (MeritConfig), ``data`` (sources -> tokenized examples),
``models`` (load θ(0)), ``conflict`` (calibration gradients, sketches, conflict
matrix), ``split`` (PCA + weighted-median split, baselines), ``train`` (one branch),
``merge`` (streaming merge operators), ``evaluate``, ``diagnostics``, ``store``.
This package never imports prefect.
"""

__version__ = "0.1.0"
