"""The pipeline's stages: what each stage does with the store (Prefect-free).

One module per stage; every stage takes the opened :class:`merit_core.store.ArtifactStore`
(it never opens one), reads its inputs, calls the method and commits its outputs.
Every stage is idempotent: if its output is already complete in the store (manifest
present) it returns the existing reference, so a retried task or a re-run flow never
redoes finished work. :mod:`~merit_core.pipeline.layout` owns every store key.

- :mod:`~merit_core.pipeline.base`: prepare θ(0)
- :mod:`~merit_core.pipeline.mixture`: resolve the mixture (tokenized data splits)
- :mod:`~merit_core.pipeline.conflict`: source gradients and the conflict matrix
- :mod:`~merit_core.pipeline.partition`: split the sources into K = 2^r groups
- :mod:`~merit_core.pipeline.branches`: train one branch; read finished branches
- :mod:`~merit_core.pipeline.merge`: merge the branches once
- :mod:`~merit_core.pipeline.evaluate`: held-out and benchmark evaluation, displacement
- :mod:`~merit_core.pipeline.reports`: run report, study seed records and report
- :mod:`~merit_core.pipeline.study`: the study protocol over these stages

``tasks/`` wraps each stage in a Prefect task; the CLI and bench/ call them directly.
"""
