"""Fill a spool with a large backlog of tiny pending objects, fast (``python -m bench.backlog``).

Runs in its own process (the spool takes an exclusive lock) and uses only the spool's public API:
``Spool.begin()`` / ``SpoolWriter.write()`` / ``commit()``, many commits at once so that the journal's
group commit batches them. The one shortcut is the documented ``FileSystem`` seam with a no-op
``fsync``: setting up a benchmark does not need durability, and 100,000 file fsyncs would take
minutes. The gateway started on this spool afterwards recovers it like any other.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from gateway.spool import FileSystem, InstanceMeta, Spool

UID_ROOT = "1.2.826.0.1.3680043.8.498.77"
BATCH = 2000


class NoSync(FileSystem):
    """The spool's file-system seam without fsync (benchmark set-up only)."""

    def fsync(self, fd: int) -> None:
        return None


def tiny_dataset() -> bytes:
    """A few hundred bytes of Explicit VR Little Endian dataset, no pixel data."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = f"{UID_ROOT}.0"
    ds.Modality = "OT"
    ds.PatientName = "BENCH^BACKLOG"
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


async def fill(root: Path, count: int, destination: str) -> None:
    spool = Spool(root, fs=NoSync())
    await spool.open()
    data = tiny_dataset()
    try:
        for start in range(0, count, BATCH):
            ids = range(start, min(count, start + BATCH))
            await asyncio.gather(*(_store(spool, i, data, destination) for i in ids))
    finally:
        await spool.close()


async def _store(spool: Spool, index: int, data: bytes, destination: str) -> None:
    meta = InstanceMeta(str(SecondaryCaptureImageStorage), f"{UID_ROOT}.{index + 1}",
                        str(ExplicitVRLittleEndian), "BENCHSCU", "BENCHGW", "127.0.0.1")
    writer = spool.begin(meta)
    writer.write(data)
    await writer.commit((destination,), ("all",))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spool_dir", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("destination")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    asyncio.run(fill(args.spool_dir, args.count, args.destination))
    print(f"{args.count} pending objects for {args.destination} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
