"""Pipeline protocols that compose :mod:`merit_core.stages` (Prefect-free): the flows in
``flows/`` run them with Prefect tasks, bench/gpu/ with the bare stage functions."""
