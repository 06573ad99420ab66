"""Shared fixtures: real peers (see tests/peers.py), free ports, sample files."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import peers as peer_tools
import pytest
from hypothesis import settings
from peers import Orthanc, Peers, StoreSCP, WorklistSCP

# no per-example deadline: on a loaded 2-core CI machine it is a timed assertion in disguise
settings.register_profile("gateway", deadline=None)
settings.load_profile("gateway")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Tests marked ``peer`` fail instead of skipping under CI=true."""
    report = yield
    peer_tools.fail_skipped_peer_test(report, marked_peer=item.get_closest_marker("peer") is not None)
    return report


@pytest.fixture
def free_port() -> int:
    return peer_tools.free_port()


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    pool = Peers(tmp_path / "peers")
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def store_scp(peers: Peers) -> Callable[..., StoreSCP]:
    """Factory: ``store_scp(ae_title=..., refuse=..., ...)`` -> a started DCMTK storescp."""
    return peers.store_scp


@pytest.fixture
def worklist_scp(peers: Peers) -> Callable[..., WorklistSCP]:
    """Factory: ``worklist_scp(items, ae_title=...)`` -> a started DCMTK wlmscpfs."""
    return peers.worklist_scp


@pytest.fixture
def orthanc(peers: Peers) -> Callable[..., Orthanc]:
    """Factory: ``orthanc(modalities={...}, worklist_items=[...])`` -> a started Orthanc."""
    return peers.orthanc


@pytest.fixture(scope="session")
def sample_files_by_category() -> dict[str, Path]:
    return peer_tools.sample_files()


@pytest.fixture
def sample_files(sample_files_by_category: dict[str, Path]) -> dict[str, Path]:
    """Category (``implicit_le``, ``jpeg_baseline``, ``rle``...) -> a pydicom test file."""
    return dict(sample_files_by_category)
