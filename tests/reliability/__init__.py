"""Reliability suite (issue 9): load held, faults survived, bad input refused, nothing lost.

Every scenario is bounded in count and time and talks to loopback only. The shared machinery
(server subprocesses, the selector-driven client fleet) lives in `harness.py`, so
`scripts/reliability_report.py` runs exactly the same scenarios.
"""
