"""Deployment ``merit/full`` (prefect.yaml): flow ``merit`` with a flow-level retry policy."""

from flows.merit import merit

# Deployment merit/full (prefect.yaml) runs this: flow `merit`, retried once, 2 minutes
# after a failure, in the same flow run. The retry keeps the run's id, so it resumes: θ(0),
# tokenized sources, source gradients, committed branches and merges are reused from the
# store, completed branch flow runs are reused and failed or crashed ones rescheduled (they
# resume from their newest checkpoint). Local `merit run` keeps no flow retries: a
# person is watching, and the tasks retry what retries can fix (docs/deployments.md).
merit_full = merit.with_options(retries=1, retry_delay_seconds=120)
