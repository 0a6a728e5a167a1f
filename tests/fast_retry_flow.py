"""merit/full's flow with its one flow-level retry after 5 s instead of 120 s, so that the
Docker fault tests (tests/test_docker.py) see the retry without waiting two minutes.
Deployed by that test only, as `merit/full-fast-retry`."""

from flows.merit import merit

merit_full_fast_retry = merit.with_options(retries=1, retry_delay_seconds=5)
