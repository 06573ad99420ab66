"""Interleaved A/B of two gateway versions in one run: the only comparison that survives the drift of
a shared machine (docs/performance.md, "What we tried: the second session").

    git worktree add /tmp/before <commit>          # or any checkout of this repository
    python -m bench.ab /tmp/before .               # A = before, B = this checkout
    python -m bench.ab /tmp/before . --rows ingest,e2e --rounds 5

Every round runs each chosen scenario once per tree, A then B (the direct DCMTK hop once per round,
for scale), with the same corpus and the same scenario code (this checkout's bench); only the
gateway process comes from the tree. Prints the median rate and gateway CPU of each row per tree,
and B / A of the medians and of each round.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.scenarios import PROFILES, SCENARIOS, Context, Profile, Sample
from bench.servers import REPO_ROOT

ROWS = ("ingest", "e2e", "fanout")  # the default rows; any gateway scenario with one row works
SEED = 20240601  # the corpus seed of ``python -m bench``: the same corpus folder is reused


@dataclass
class Series:
    """One row's samples for one tree, one per round."""

    samples: list[Sample] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [s.count / s.seconds for s in self.samples]

    def median_rate(self) -> float:
        return statistics.median(self.rates())

    def median_cpu(self) -> float:
        return statistics.median(s.servers["gateway"].cpu_seconds for s in self.samples)


def run(trees: Mapping[str, Path], rows: Sequence[str], *, rounds: int, out: Path,
        profile: Profile, progress: Callable[[str], None],
        receivers: Path | None = None) -> dict[tuple[str, str], Series]:
    """``{(row, tree label): Series}``; the reference row is under the label "-"."""
    results: dict[tuple[str, str], Series] = {}
    reference = Context(out, profile, seed=SEED, receivers=receivers)
    for row in rows:  # once, for both trees: a big object, a backlog spool, a rule set
        prepare = SCENARIOS[row].prepare
        if prepare is not None:
            prepare(reference)
    contexts = {label: _for_tree(reference, tree) for label, tree in trees.items()}
    for index in range(rounds):
        for name, sample in SCENARIOS["reference"].run(reference, index).items():
            results.setdefault((name, "-"), Series()).samples.append(sample)
        for row in rows:
            for label, ctx in contexts.items():
                for name, sample in SCENARIOS[row].run(ctx, index).items():
                    results.setdefault((name, label), Series()).samples.append(sample)
                    progress(f"[{index + 1}/{rounds}] {name} {label}: "
                             f"{sample.count / sample.seconds:.1f} {sample.unit}/s")
    return results


def _for_tree(prepared: Context, tree: Path) -> Context:
    """A context whose gateway comes from ``tree``, sharing what ``prepared`` built."""
    ctx = copy.copy(prepared)
    ctx.gateway_tree = tree
    return ctx


def markdown(results: Mapping[tuple[str, str], Series], trees: Mapping[str, Path],
             rows: Sequence[str]) -> str:
    a, b = trees
    out = [f"A = {trees[a]}, B = {trees[b]}", ""]
    if ("reference", "-") in results:
        out += [f"direct DCMTK hop in the same rounds: {results['reference', '-'].median_rate():.1f} "
                "images/s", ""]
    out += ["| row | A rate | B rate | B / A | per round | A gateway CPU s | B gateway CPU s |",
            "|---|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        for name in SCENARIOS[row].rows:
            first, second = results[name, a], results[name, b]
            per_round = ", ".join(f"{y / x:.2f}" for x, y in zip(first.rates(), second.rates(),
                                                                  strict=True))
            out.append(f"| {name} | {first.median_rate():.1f} | {second.median_rate():.1f} | "
                       f"{second.median_rate() / first.median_rate():.2f} | {per_round} | "
                       f"{first.median_cpu():.2f} | {second.median_cpu():.2f} |")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="checkout whose gateway is A (e.g. the version before)")
    parser.add_argument("b", type=Path, help="checkout whose gateway is B (e.g. this one: .)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"scenarios to compare, comma-separated (default {','.join(ROWS)})")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full",
                        help="corpus size: full (500 images), quick (100), smoke (a handful)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out",
                        help="corpus and working folders (default bench/out)")
    parser.add_argument("--receivers", type=Path, default=None, metavar="DIR",
                        help="storescp writes under DIR (e.g. a tmpfs), as in python -m bench")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [row for row in args.rows.split(",") if row]
    unknown = [row for row in rows if row not in SCENARIOS or row == "reference"]
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    missing = [str(tree) for tree in trees.values() if not (tree / "gateway" / "cli.py").is_file()]
    if unknown or missing or args.rounds < 1:
        print(f"unknown rows: {unknown}; not checkouts of this repository: {missing}; "
              f"rounds: {args.rounds}", file=sys.stderr)
        return 2
    out: Path = args.out.resolve()
    receivers: Path | None = args.receivers.resolve() if args.receivers is not None else None
    try:
        results = run(trees, rows, rounds=args.rounds, out=out, profile=PROFILES[args.profile],
                      progress=lambda message: print(message, file=sys.stderr, flush=True),
                      receivers=receivers)
    finally:
        shutil.rmtree(out / "work", ignore_errors=True)
    print(markdown(results, trees, rows))
    where = receivers if receivers is not None else "each round's working folder"
    print(f"\nstorescp wrote into {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
