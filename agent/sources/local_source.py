"""Feed the state store from the local config file, and follow edits to it.

The file is polled rather than watched with inotify: polling sees every way a file can be
changed (written in place, replaced by rename, on a filesystem without inotify, through a
mounted ConfigMap's symlink swap) with one mechanism, and a stat every half second is cheap.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.drain import stopped_within
from agent.sources.local_config import ConfigError, LocalConfig, parse_local_config
from agent.state.store import MeshState, StateStore
from agent.state.waypoint_only import allow_only_waypoint_policies

log = structlog.get_logger("agent.state")

# A write in the same timestamp tick as the one we read, leaving the size unchanged, would not
# change the stamp. When the file we read was modified this recently, it is read once more on
# the next poll (and if unchanged, silently). One second covers coarse-grained filesystems.
_RECENT_WRITE_NS = 1_000_000_000

# A file that keeps changing under the reader is given this many tries, then refused.
_READ_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class _FileStamp:
    """What tells one version of the file from another without reading it. The inode makes a
    replacement by rename visible even when it keeps the size and the timestamp."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, status: os.stat_result) -> _FileStamp:
        return cls(status.st_mtime_ns, status.st_size, status.st_ino)


def mesh_state_of(config: LocalConfig) -> MeshState:
    guards = allow_only_waypoint_policies(config.workloads, config.services)
    return MeshState(
        config.workloads,
        config.services,
        config.policies + guards,
        config.namespaces,
        config.routes,
        config.waypoint_policies,
    )


class LocalConfigSource:
    def __init__(
        self,
        path: Path,
        store: StateStore,
        poll_interval: float = 0.5,
        settle_interval: float = 0.1,
    ) -> None:
        self.path = path
        self.store = store
        self.poll_interval = poll_interval
        # How long the file's stamp must stay the same before it is read: a writer that is
        # half-way through must not have its half file parsed.
        self.settle_interval = settle_interval
        # The version last read, whether it was applied or rejected, so that a rejected file
        # is reported once rather than on every poll.
        self._stamp: _FileStamp | None = None
        self._text: str | None = None
        self._read_again = False
        self._unreadable_reported = False
        # Why the file as it is now is not in force (readiness shows it), or None.
        self.rejected: str | None = None
        self.rejections = 0

    def load_initial(self) -> MeshState:
        """Load the file into the store. Raises ConfigError: the agent must not start on a
        config it cannot read or parse."""
        text, stamp = self._read()
        state = mesh_state_of(parse_local_config(text, str(self.path)))
        self.store.replace(state)
        self._remember(text, stamp)
        log.info("config loaded", file=str(self.path), **_counts(state))
        return state

    async def run(self, stop: asyncio.Event) -> None:
        """Reload the file whenever it changes, until `stop` is set. A bad or missing file is
        logged as "config rejected" and the state in force stays as it is."""
        while not await stopped_within(stop, self.poll_interval):
            try:
                await self._check(stop)
            except Exception:
                # A watcher that died would leave the agent on an old config without a word;
                # keep polling, the next change may well load.
                log.exception("config check failed", file=str(self.path))

    async def _check(self, stop: asyncio.Event) -> None:
        try:
            stamp = _stat(self.path)
        except ConfigError as error:
            if not self._unreadable_reported:
                self._reject(error)
                self._unreadable_reported = True
                # Forgotten, so that when the file returns it is read and reported even if
                # it comes back exactly as it was.
                self._stamp, self._text = None, None
            return
        self._unreadable_reported = False
        if stamp == self._stamp and not self._read_again:
            return
        if not await self._settled(stamp, stop):
            return
        try:
            text, stamp = await asyncio.to_thread(self._read)
        except ConfigError as error:
            self._reject(error)
            # Not retried until the file changes: an unreadable file stays unreadable.
            self._stamp, self._text, self._read_again = stamp, None, False
            return
        if text == self._text:
            # Saved again unchanged, or touched: nothing to apply, and nothing to report.
            self._remember(text, stamp)
            return
        try:
            config = await asyncio.to_thread(parse_local_config, text, str(self.path))
        except ConfigError as error:
            self._reject(error)
            self._remember(text, stamp)
            return
        state = mesh_state_of(config)
        self.store.replace(state)
        self._remember(text, stamp)
        self.rejected = None
        log.info("config reloaded", file=str(self.path), **_counts(state))

    async def _settled(self, stamp: _FileStamp, stop: asyncio.Event) -> bool:
        """Wait until the file's stamp holds still for settle_interval. False if the file went
        away meanwhile (the next poll reports that) or the source is stopping."""
        while True:
            if await stopped_within(stop, self.settle_interval):
                return False
            try:
                again = _stat(self.path)
            except ConfigError:
                return False
            if again == stamp:
                return True
            stamp = again

    def _read(self) -> tuple[str, _FileStamp]:
        """The file's text and the stamp of the version read. The stamp is taken from the open
        file and compared after reading, so the text is one version, not a mix of two."""
        for _ in range(_READ_ATTEMPTS):
            try:
                with self.path.open("rb") as file:
                    before = _FileStamp.of(os.fstat(file.fileno()))
                    data = file.read()
                    after = _FileStamp.of(os.fstat(file.fileno()))
            except OSError as exc:
                raise ConfigError(str(self.path), None, f"cannot read: {exc.strerror}") from exc
            if before == after:
                try:
                    return data.decode("utf-8"), before
                except UnicodeDecodeError as exc:
                    raise ConfigError(
                        str(self.path), None, f"cannot read: not UTF-8 ({exc.reason})"
                    ) from exc
            time.sleep(self.settle_interval)
        raise ConfigError(str(self.path), None, "cannot read: the file kept changing")

    def _remember(self, text: str, stamp: _FileStamp) -> None:
        self._stamp, self._text = stamp, text
        age_ns = time.time_ns() - stamp.mtime_ns
        self._read_again = 0 <= age_ns < _RECENT_WRITE_NS

    def _reject(self, error: ConfigError) -> None:
        self.rejected = f"config rejected, the last good one stays in force: {error}"
        self.rejections += 1
        log.error(
            "config rejected",
            file=error.source,
            line=error.line,
            reason=error.reason,
            error=str(error),
        )


def _stat(path: Path) -> _FileStamp:
    try:
        return _FileStamp.of(path.stat())
    except FileNotFoundError as exc:
        raise ConfigError(str(path), None, "file is missing") from exc
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot stat: {exc.strerror}") from exc


def _counts(state: MeshState) -> dict[str, int]:
    return {
        "workloads": len(state.workloads),
        "services": len(state.services),
        "policies": len(state.policies),
    }
