"""``dicom-gateway queue``: inspect and repair the forwarding queues, safely beside a running gateway.

These commands open the spool's journal read-write but never recover or ingest; a running gateway
picks their changes up within seconds (its forwarders rescan the journal).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from dataclasses import asdict

import anyio

from gateway.errors import ConfigError
from gateway.header import HeaderUnreadable, header_from_dataset, read_header_file
from gateway.journal import ItemInfo
from gateway.routing import route
from gateway.rules import load_rules
from gateway.settings import Settings, load_settings
from gateway.spool import Spool

ConfigOption = Callable[[argparse.ArgumentParser], None]


def add_queue_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                       config_option: ConfigOption) -> None:
    queue = commands.add_parser("queue", help="inspect and repair forwarding queues")
    sub = queue.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)

    listing = sub.add_parser("list", help="counts per destination, and items")
    listing.add_argument("--destination")
    listing.add_argument("--dead", action="store_true", help="dead-lettered items")
    listing.add_argument("--held", action="store_true", help="instances no rule routed")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    retry = sub.add_parser("retry", help="re-queue dead-lettered items")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("destination", nargs="?")
    target.add_argument("--all", action="store_true")
    retry.set_defaults(func=cmd_retry)

    purge = sub.add_parser("purge", help="delete dead-lettered items (needs --yes)")
    purge_target = purge.add_mutually_exclusive_group(required=True)
    purge_target.add_argument("destination", nargs="?")
    purge_target.add_argument("--all", action="store_true")
    purge.add_argument("--yes", action="store_true", help="confirm: the objects are deleted")
    purge.set_defaults(func=cmd_purge)

    reroute = sub.add_parser("reroute", help="apply the current rules to held instances")
    reroute.set_defaults(func=cmd_reroute)
    for parser in (listing, retry, purge, reroute):
        config_option(parser)


def _open(settings: Settings) -> Spool:
    """The spool for operator commands (``open_readonly`` says clearly when there is none)."""
    return Spool(settings.spool_dir)


def cmd_list(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    return anyio.run(_list, settings, args)


async def _list(settings: Settings, args: argparse.Namespace) -> int:
    spool = _open(settings)
    await spool.open_readonly()
    try:
        counts = await spool.counts()
        held = await spool.held_count()
        items = await spool.list_items(destination=args.destination, dead=args.dead,
                                       held=args.held, limit=args.limit)
    finally:
        await spool.close()
    if args.json:
        print(json.dumps({"destinations": {k: asdict(v) for k, v in counts.items()},
                          "held": held, "items": [asdict(i) for i in items]}, default=str))
        return 0
    print(f"{'destination':<20} {'pending':>8} {'dead':>6}  oldest pending")
    for name in sorted(set(counts) | set(settings.destinations)):
        c = counts.get(name)
        oldest = _when(c.oldest_received_at) if c and c.oldest_received_at else "-"
        print(f"{name:<20} {c.pending if c else 0:>8} {c.dead if c else 0:>6}  {oldest}")
    print(f"held (no rule matched): {held}")
    if items:
        print()
        for item in items:
            print(_item_line(item))
    return 0


def _item_line(item: ItemInfo) -> str:
    error = f"  last error: {item.last_error}" if item.last_error else ""
    return (f"#{item.instance_id} {item.destination or 'held'} {item.state} attempts={item.attempts} "
            f"sop={item.sop_instance_uid} from={item.calling_ae} received={_when(item.received_at)}"
            f"{error}")


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def cmd_retry(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    destination = None if args.all else _destination(settings, args.destination)
    count = anyio.run(_operate, settings, "retry", destination)
    print(f"re-queued {count} dead-lettered deliveries")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    destination = None if args.all else _destination(settings, args.destination)
    if not args.yes:
        print("purge deletes the dead-lettered objects for good; repeat with --yes to confirm",
              file=sys.stderr)
        return 1
    count = anyio.run(_operate, settings, "purge", destination)
    print(f"purged {count} dead-lettered deliveries")
    return 0


def _destination(settings: Settings, name: str) -> str:
    if name not in settings.destinations:
        raise ConfigError(f"no destination named {name!r}; configured: "
                          f"{', '.join(settings.destinations) or 'none'}")
    return name


async def _operate(settings: Settings, what: str, destination: str | None) -> int:
    spool = _open(settings)
    await spool.open_readonly()
    try:
        if what == "retry":
            return await spool.retry_dead(destination)
        return await spool.purge_dead(destination)
    finally:
        await spool.close()


def cmd_reroute(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    routed, held, unreadable = anyio.run(_reroute, settings)
    print(f"rerouted {routed} held instances; {held} still held; {unreadable} unreadable")
    return 0


async def _reroute(settings: Settings) -> tuple[int, int, int]:
    ruleset = load_rules(settings.rules_dir, tuple(settings.destinations))
    spool = _open(settings)
    await spool.open_readonly()
    routed = still_held = unreadable = 0
    after = 0
    try:
        while batch := await spool.held_items(200, after):
            for item in batch:
                after = item.id
                try:
                    dataset = read_header_file(item.path, item.dataset_offset,
                                               item.transfer_syntax, ruleset.keywords)
                except (HeaderUnreadable, OSError):
                    unreadable += 1
                    continue
                header = header_from_dataset(dataset, ruleset.keywords,
                                             calling_ae=item.calling_ae,
                                             called_ae=item.called_ae, source_ip=item.source_ip)
                decision = route(header, ruleset)
                if decision.destinations:
                    await spool.reroute(item.id, decision.destinations, decision.matched)
                    routed += 1
                else:
                    still_held += 1
    finally:
        await spool.close()
    return routed, still_held, unreadable
