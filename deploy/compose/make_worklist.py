"""Write today's sample Modality Worklist items for the compose stack's RIS (Orthanc's worklist plugin).

    python make_worklist.py DIRECTORY [--station-ae US_DEMO] [--count 6]

Replaces every ``*.wl`` file in DIRECTORY with ``--count`` obviously fake ultrasound procedures
scheduled today for ``--station-ae`` (the items of ``dicom-gateway demo``). Each file is a bare
dataset in implicit VR little endian, the format DCMTK's wlmscpfs and Orthanc's worklist plugin read.
The compose file runs it once, in the gateway image, before the RIS starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from pydicom.dataset import Dataset

from gateway.demo.worklist_items import demo_worklist


def write_items(directory: Path, items: Sequence[Dataset]) -> list[Path]:
    """Replace the ``*.wl`` files of ``directory`` with ``items`` (``item-NNNN.wl``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.wl"):
        old.unlink()
    paths = []
    for index, item in enumerate(items):
        path = directory / f"item-{index:04d}.wl"
        item.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--station-ae", default="US_DEMO")
    parser.add_argument("--count", type=int, default=6)
    args = parser.parse_args(argv)
    items = demo_worklist(date.today(), station_ae=args.station_ae, n=args.count)
    paths = write_items(args.directory, items)
    print(f"wrote {len(paths)} worklist items for {args.station_ae} into {args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
