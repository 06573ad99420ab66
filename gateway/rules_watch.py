"""Hot reload of the rules directory, without a file-notification dependency.

Every ``interval`` seconds the watcher reads the ``*.yaml``/``*.yml`` files of ``rules_dir``
(following symlinks) and hashes names and contents. Only when that fingerprint differs from the last
one seen does it validate the whole set: ``on_reload(new_set)`` on success, ``on_error(err)`` on
failure (the caller keeps its current set). The same fingerprint is never validated twice, so a
broken set is reported once, not every tick. Reading contents rather than trusting mtimes also
catches a Kubernetes ConfigMap update: the kubelet swaps the ``..data`` symlink atomically, file
names stay the same and only what they point to changes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from gateway.errors import RulesError
from gateway.routing import RuleSet
from gateway.rules import RuleFile, RuleSetInvalid, compile_rules, fingerprint, read_rule_files


class RulesWatcher:
    """Polls ``rules_dir``; see the module docstring. Never raises out of ``run`` on bad rules.

    ``initial`` is the set currently in use: changes are judged against it. Without it, what is on
    disk when ``run`` starts becomes the baseline (no callback for it).
    """

    def __init__(
        self,
        rules_dir: Path,
        destinations: Collection[str],
        on_reload: Callable[[RuleSet], None],
        on_error: Callable[[RulesError], None],
        *,
        interval: float = 1.0,
        initial: RuleSet | None = None,
    ) -> None:
        self._rules_dir = rules_dir
        self._destinations = tuple(destinations)
        self._on_reload = on_reload
        self._on_error = on_error
        self._interval = interval
        self._current = initial
        self._seen: str | None = initial.fingerprint if initial is not None else None
        self._lock = anyio.Lock()

    @property
    def current(self) -> RuleSet | None:
        """The last valid set: ``initial`` or the last one passed to ``on_reload``."""
        return self._current

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self._seen is None:
            files = await anyio.to_thread.run_sync(self._read)
            self._seen = _state(files)
        task_status.started()
        while True:
            await anyio.sleep(self._interval)
            await self.poll()

    async def poll(self) -> None:
        """Look once: validate and report if the files changed since the last look."""
        await self._check(force=False)

    async def reload_now(self) -> None:
        """Validate and report now, even if nothing changed (an operator's SIGHUP)."""
        await self._check(force=True)

    async def _check(self, *, force: bool) -> None:
        async with self._lock:
            files = await anyio.to_thread.run_sync(self._read)
            state = _state(files)
            if state == self._seen and not force:
                return
            self._seen = state
            if isinstance(files, RuleSetInvalid):
                self._on_error(files)
                return
            try:
                ruleset = await anyio.to_thread.run_sync(compile_rules, files, self._destinations)
            except RulesError as err:
                self._on_error(err)
                return
            self._current = ruleset
            self._on_reload(ruleset)

    def _read(self) -> tuple[RuleFile, ...] | RuleSetInvalid:
        try:
            return read_rule_files(self._rules_dir)
        except RuleSetInvalid as err:
            return err


def _state(files: tuple[RuleFile, ...] | RuleSetInvalid) -> str:
    """What the directory looks like: the fingerprint, or the read error (reported once too)."""
    return f"unreadable: {files}" if isinstance(files, RuleSetInvalid) else fingerprint(files)
