"""Python's cyclic garbage collector, set up for the long-running processes (`serve`, `worker`).

With the interpreter's defaults (a collection of the youngest generation every 700 net
allocations, an older one every 10 of those) the worker spent about 40% of its CPU collecting
while it drained a backlog: each batch allocates tens of thousands of short-lived objects
(rows, events, buddies, the write's parameters), almost none of them in a cycle, so reference
counting frees them anyway, while every full collection also walked everything the process
built at startup (modules, the pools, arq). Measured on the bench machine (bench/BENCHMARKS.md,
"The garbage collector"): 5.2 s of 13.4 s of the worker's CPU for a 100,000-delivery backlog,
0.6 s of 8.8 s with what is set here, the RSS unchanged (about 95 MB).

So a process freezes what its startup built (`gc.freeze`: those objects are never examined
again) and collects the youngest generation only every GC_THRESHOLDS[0] net allocations. What
is in a cycle is still collected, later; nothing else changes.
"""

from __future__ import annotations

import gc

import structlog

log = structlog.get_logger(__name__)

# (youngest, middle, oldest), as gc.set_threshold takes them: a collection of the youngest
# generation every 50,000 net allocations, of the middle one every 20 of those, of all every
# 20 of the middle ones (and, as CPython does, only once a quarter of the long-lived objects
# are new).
GC_THRESHOLDS = (50_000, 20, 20)


def tune(process: str) -> None:
    """Collect once, freeze what is left, raise the thresholds; one line says so."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info(
        "gc_tuned", process=process, thresholds=list(GC_THRESHOLDS), frozen=gc.get_freeze_count()
    )
