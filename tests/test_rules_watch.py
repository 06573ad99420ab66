"""Hot reload: edits, new and removed files, broken sets, a ConfigMap symlink swap; no sleeps."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from gateway.errors import RulesError
from gateway.routing import RuleSet
from gateway.rules import RuleSetInvalid, load_rules
from gateway.rules_watch import RulesWatcher

DESTINATIONS = ("PACS_TEST", "PACS_PROD")
WAIT = 5.0  # seconds: the bound of every wait (each one normally ends in milliseconds)

Event = tuple[str, RuleSet | RulesError]


def rule(name: str, destination: str = "PACS_TEST") -> str:
    return f"rules:\n  - name: {name}\n    destinations: [{destination}]\n"


def replace_file(path: Path, text: str) -> None:
    """Write atomically (as editors and the kubelet do) so a poll never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


class Recorder:
    """Callbacks that queue what they receive; tests await the next one with a bound."""

    def __init__(self) -> None:
        self.send: MemoryObjectSendStream[Event]
        self.receive: MemoryObjectReceiveStream[Event]
        self.send, self.receive = anyio.create_memory_object_stream[Event](100)

    def on_reload(self, ruleset: RuleSet) -> None:
        self.send.send_nowait(("reload", ruleset))

    def on_error(self, error: RulesError) -> None:
        self.send.send_nowait(("error", error))

    async def next_reload(self) -> RuleSet:
        with anyio.fail_after(WAIT):
            kind, value = await self.receive.receive()
        assert kind == "reload" and isinstance(value, RuleSet), value
        return value

    async def next_error(self) -> RulesError:
        with anyio.fail_after(WAIT):
            kind, value = await self.receive.receive()
        assert kind == "error" and isinstance(value, RulesError), value
        return value

    def pending(self) -> list[Event]:
        events: list[Event] = []
        while True:
            try:
                events.append(self.receive.receive_nowait())
            except anyio.WouldBlock:
                return events


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    recorder = Recorder()
    with recorder.send, recorder.receive:
        yield recorder


def names(ruleset: RuleSet) -> list[str]:
    return [r.name for r in ruleset.rules]


def watcher_for(
    rules_dir: Path, recorder: Recorder, *, interval: float = 3600.0, initial: bool = True
) -> RulesWatcher:
    return RulesWatcher(
        rules_dir,
        DESTINATIONS,
        recorder.on_reload,
        recorder.on_error,
        interval=interval,
        initial=load_rules(rules_dir, DESTINATIONS) if initial else None,
    )


async def test_edits_new_and_removed_files_are_reloaded(tmp_path: Path, recorder: Recorder) -> None:
    replace_file(tmp_path / "10-a.yaml", rule("a"))
    watcher = watcher_for(tmp_path, recorder)
    await watcher.poll()
    assert recorder.pending() == []

    replace_file(tmp_path / "10-a.yaml", rule("a", "PACS_PROD"))
    await watcher.poll()
    edited = await recorder.next_reload()
    assert edited.rules[0].destinations == ("PACS_PROD",)
    assert watcher.current is edited

    replace_file(tmp_path / "20-b.yml", rule("b"))
    await watcher.poll()
    assert names(await recorder.next_reload()) == ["a", "b"]

    (tmp_path / "10-a.yaml").unlink()
    await watcher.poll()
    assert names(await recorder.next_reload()) == ["b"]
    assert recorder.pending() == []


async def test_unchanged_contents_are_not_reloaded(tmp_path: Path, recorder: Recorder) -> None:
    path = tmp_path / "10-a.yaml"
    replace_file(path, rule("a"))
    watcher = watcher_for(tmp_path, recorder)
    replace_file(path, rule("a"))  # same bytes, new inode and mtime
    os.utime(path, (1, 1))
    (tmp_path / "notes.txt").write_text("not a rule file")
    await watcher.poll()
    assert recorder.pending() == []


async def test_a_broken_set_is_reported_once_and_the_last_good_set_kept(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "10-a.yaml"
    replace_file(path, rule("a"))
    watcher = watcher_for(tmp_path, recorder)
    good = watcher.current

    replace_file(path, rule("a", "PACS_TST"))
    await watcher.poll()
    error = await recorder.next_error()
    assert isinstance(error, RuleSetInvalid)
    assert [(p.file, p.line) for p in error.problems] == [(path, 3)]
    assert watcher.current is good
    await watcher.poll()
    assert recorder.pending() == []  # the same broken contents are not reported again

    replace_file(path, rule("a", "PACS_PROD"))
    await watcher.poll()
    assert (await recorder.next_reload()).rules[0].destinations == ("PACS_PROD",)


async def test_reload_now_reports_even_without_a_change(tmp_path: Path, recorder: Recorder) -> None:
    replace_file(tmp_path / "10-a.yaml", rule("a"))
    watcher = watcher_for(tmp_path, recorder)
    await watcher.reload_now()
    assert names(await recorder.next_reload()) == ["a"]
    replace_file(tmp_path / "10-a.yaml", "rules: [")
    await watcher.reload_now()
    await recorder.next_error()
    await watcher.reload_now()
    await recorder.next_error()


async def test_a_vanished_directory_is_an_error_not_a_crash(tmp_path: Path, recorder: Recorder) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    replace_file(rules_dir / "10-a.yaml", rule("a"))
    watcher = watcher_for(rules_dir, recorder)
    shutil.rmtree(rules_dir)
    await watcher.poll()
    assert "does not exist" in str(await recorder.next_error())
    await watcher.poll()
    assert recorder.pending() == []
    rules_dir.mkdir()
    replace_file(rules_dir / "10-a.yaml", rule("a"))
    await watcher.poll()
    assert names(await recorder.next_reload()) == ["a"]


async def test_without_initial_what_is_on_disk_at_start_is_the_baseline(
    tmp_path: Path, recorder: Recorder
) -> None:
    replace_file(tmp_path / "10-a.yaml", rule("a"))
    watcher = watcher_for(tmp_path, recorder, initial=False)
    assert watcher.current is None
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        await watcher.poll()
        assert recorder.pending() == []
        replace_file(tmp_path / "10-a.yaml", rule("b"))
        await watcher.poll()
        assert names(await recorder.next_reload()) == ["b"]
        tg.cancel_scope.cancel()


async def test_the_watch_loop_reloads_edits_reports_breakage_and_recovers(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "10-a.yaml"
    replace_file(path, rule("a"))
    watcher = watcher_for(tmp_path, recorder, interval=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        replace_file(path, rule("edited"))
        assert names(await recorder.next_reload()) == ["edited"]

        replace_file(path, rule("edited") + "    colour: red\n")
        error = await recorder.next_error()
        assert "colour" in str(error)

        replace_file(path, rule("fixed"))
        assert names(await recorder.next_reload()) == ["fixed"]  # no reload came in between
        tg.cancel_scope.cancel()


def publish_configmap(rules_dir: Path, version: str, files: dict[str, str]) -> None:
    """What the kubelet does: a new timestamped dir, then swap ``..data`` by an atomic rename."""
    snapshot = rules_dir / f"..{version}"
    snapshot.mkdir()
    for name, text in files.items():
        (snapshot / name).write_text(text, encoding="utf-8")
    temporary = rules_dir / "..data_tmp"
    os.symlink(snapshot.name, temporary)
    os.replace(temporary, rules_dir / "..data")
    for name in files:
        if not (rules_dir / name).is_symlink():
            os.symlink(f"..data/{name}", rules_dir / name)


async def test_a_configmap_symlink_swap_is_reloaded(tmp_path: Path, recorder: Recorder) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    publish_configmap(rules_dir, "2026_01_01_00_00_00.1", {"10-a.yaml": rule("v1")})
    watcher = watcher_for(rules_dir, recorder, interval=0.01)
    assert watcher.current is not None and names(watcher.current) == ["v1"]
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        publish_configmap(rules_dir, "2026_01_02_00_00_00.2", {"10-a.yaml": rule("v2")})
        shutil.rmtree(rules_dir / "..2026_01_01_00_00_00.1")
        reloaded = await recorder.next_reload()
        assert names(reloaded) == ["v2"]
        assert reloaded.files == (rules_dir / "10-a.yaml",)

        files = {"10-a.yaml": rule("v3"), "20-b.yaml": rule("b", "PACS_PROD")}
        publish_configmap(rules_dir, "2026_01_03_00_00_00.3", files)
        assert names(await recorder.next_reload()) == ["v3", "b"]
        tg.cancel_scope.cancel()
