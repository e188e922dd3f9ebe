"""One command for the whole suite.

    .venv/bin/python -m bench.run [--quick] [--only NAME ...] [--duration S] [--out FILE]

A full run appends its tables to bench/BENCHMARKS.md (or --out); --quick (the CI smoke run)
uses tiny sizes, writes no file unless --out is given, and exits non-zero when a scenario
failed to run or saw errors. Targets are reported, never enforced: benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import orjson

from bench import backlog, feed, flush, read, report, scale, scenarios, subscription, upgrade
from bench.common import QUICK, Ctx, Plan
from bench.report import Section

SCENARIOS: dict[str, Callable[[Ctx], Awaitable[Section]]] = {
    "receiver": scenarios.receiver,
    "ack_latency": scenarios.ack_latency,
    "inbox_flush": flush.inbox_flush,
    "backlog": backlog.backlog,
    "backlog_feed": feed.backlog_feed,
    "freshness": scenarios.freshness,
    "read": read.read,
    "feed_read": feed.feed_read,
    "subscription": subscription.subscription,
    "scale": scale.scale,
    "upgrade": upgrade.upgrade,
}
# `scale` and `upgrade` fill 20M rows (many minutes): only when named, or in a quick run.
LONG = ("scale", "upgrade")
DEFAULT = [name for name in SCENARIOS if name not in LONG]
BENCH_DIR = Path(__file__).resolve().parent


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, about 110 s: CI smoke")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"scenarios to run, of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--duration", type=float, help="seconds per timed load phase")
    parser.add_argument("--out", type=Path, help="Markdown file to append results to")
    parser.add_argument(
        "--format",
        default="mixed",
        choices=["v2", "v1", "mixed"],
        help="wire format of the generated deliveries (mixed: 70%% v2, 30%% v1)",
    )
    parser.add_argument(
        "--probe",
        default="sse",
        choices=["sse", "poll"],
        help="how the freshness probe watches a buddy",
    )
    parser.add_argument("--buddies", type=int, help="buddies the deliveries spread over")
    parser.add_argument(
        "--scale-sizes",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        help="comma-separated buddy counts for `scale`",
    )
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line to print above this run's tables (repeatable)",
    )
    parser.add_argument("--logs", type=Path, help="directory for logs (default: a temp dir)")
    return parser.parse_args(argv)


def plan_for(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else Plan()
    if args.duration:
        plan = plan.with_duration(args.duration)
    if args.buddies:
        plan = replace(plan, buddies=args.buddies)
    if args.scale_sizes:
        plan = replace(plan, scale_sizes=args.scale_sizes)
    return plan


async def main(argv: list[str]) -> int:
    args = parse(argv)
    names = args.only or (list(SCENARIOS) if args.quick else DEFAULT)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="hm-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    out = args.out or (None if args.quick else BENCH_DIR / "BENCHMARKS.md")
    plot = BENCH_DIR / "scale.png" if out is not None else logs / "scale.png"
    ctx = Ctx(plan_for(args), logs, args.format, args.probe, plot)
    print(f"logs: {logs}", file=sys.stderr)
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    info = await report.machine()
    sections: list[Section] = []
    failed = False
    started = time.monotonic()
    for name in names:
        settled = await report.settle(2.0 if args.quick else 60.0)
        t0 = time.monotonic()
        load_before = report.loadavg()
        print(f"[{time.monotonic() - started:6.1f}s] {name} ...", file=sys.stderr, flush=True)
        try:
            section = await SCENARIOS[name](ctx)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            section = Section(name, name, problems=[f"scenario failed: {exc!r}"])
        section.blocks.append(
            f"_{time.monotonic() - t0:.0f} s ({settled}); load average before "
            f"{load_before}, after {report.loadavg()}._"
        )
        sections.append(section)
        said = "; ".join(section.problems + section.warnings) or "ok"
        print(
            f"[{time.monotonic() - started:6.1f}s] {name}: {said}",
            file=sys.stderr,
            flush=True,
        )
    command = ".venv/bin/python -m bench.run " + shlex.join(argv)
    notes = list(args.note)
    if args.quick:
        notes.append("Quick run: sizes are for smoke-testing the suite; figures mean nothing.")
    text = report.render(when, command.strip(), info, notes, sections)
    print(text)
    (logs / "results.json").write_bytes(
        orjson.dumps(
            {s.name: s.data for s in sections}, default=str, option=orjson.OPT_NON_STR_KEYS
        )
    )
    if out is not None:
        report.append(out, text)
        print(f"appended to {out}", file=sys.stderr)
    print(
        f"total {time.monotonic() - started:.0f} s; logs and raw results in {logs}", file=sys.stderr
    )
    problems = any(s.problems for s in sections)
    return 1 if failed or (args.quick and problems) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
