"""The parent's side of a container: fork it, read its frames, reap it.

:class:`Engine` is the engine's front door: ``run(spec, body, on_frame)``
runs ``body`` as PID 1 of a container built from ``spec``, hands every
non-terminal frame to ``on_frame`` as it arrives, and returns how the
container ended.  It owns the per-process resources that make that fast:
a PID-namespace fd (one fork instead of two), the diagnostics memfd, and the
prebuild helper that assembles the next container's namespaces while the
current one runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gc
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Final, Literal

from . import _syscalls as sc
from . import cgroup, init, namespaces, process, protocol
from .limits import Limits, Usage
from .pool import NamespacePool
from .spec import Body, ContainerSpec
from .zygote import Warm, Zygote, ZygoteError, eligible

#: Seconds between the child's traceback dump at the timeout and the parent's SIGKILL.
TIMEOUT_GRACE: Final = 0.5
_F_SETPIPE_SZ: Final = 1031
_PIPE_SIZE: Final = 1 << 20

#: How a container ended.  "aborted" is set by the caller when it was itself interrupted while
#: waiting (pytest-timeout's alarm); the engine never sets it.
OutcomeKind = Literal["done", "exit", "interrupt", "error", "crashed", "timeout", "aborted"]
_TERMINAL_KINDS: Final[dict[protocol.Kind, OutcomeKind]] = {
    protocol.Kind.DONE: "done",
    protocol.Kind.EXIT: "exit",
    protocol.Kind.INTERRUPT: "interrupt",
    protocol.Kind.ERROR: "error",
}

#: Receives each non-terminal frame as it arrives.
OnFrame = Callable[[protocol.Kind, Any], None]


@dataclasses.dataclass
class Outcome:
    """How a container ended, as far as the parent could see."""

    kind: OutcomeKind
    host_pid: int = 0
    #: ``os.waitstatus_to_exitcode`` of the process we forked (negative: killed by that signal); None if not reaped yet.
    exitstatus: int | None = None
    #: EXIT: (msg, returncode); ERROR: message; crashed: what went wrong with the stream, if anything.
    payload: Any = None
    #: What faulthandler wrote inside (fatal signal or timeout traceback).
    diag: str = ""
    elapsed: float = 0.0
    #: The kernel's OOM killer acted in the container's cgroup.
    oom_killed: bool = False
    #: What the container used, when the spec asked for it.
    usage: Usage | None = None


def _remove(group: cgroup.Cgroup) -> None:
    """Kill what is left in a container's cgroup and remove it; the session's cleanup retries a failure."""
    with contextlib.suppress(cgroup.CgroupError, OSError):
        group.remove()


def describe_status(status: int | None) -> str:
    if status is None:
        return "container ended without a status"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "unknown signal"
        return f"container exited with signal {-status} ({name})"
    return f"container exited with status {status}"


class Engine:
    """Makes containers for one process and keeps track of their PIDs until reaped."""

    def __init__(self, rootless: bool, prebuild: bool = True, prefork: bool = True, prefault: bool = True) -> None:
        self.rootless = rootless
        self._pidns_fd = -1 if rootless else os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._diag_fd = os.memfd_create("lonely-diag", os.MFD_CLOEXEC)
        #: A cgroup made ahead of time for the next container: (limits, usage, cgroup).
        self._spare: tuple[Limits, bool, cgroup.Cgroup] | None = None
        #: Finished containers not waited for yet, with the cgroup to remove once they are gone.
        self._unreaped: list[tuple[int, cgroup.Cgroup | None]] = []
        #: Cgroups of finished containers of the zygote's, to remove once empty.
        self._emptying: list[cgroup.Cgroup] = []
        # gc.unfreeze() thaws everything: if the user froze objects before the first container
        # (their own fork-friendliness), keep all frozen rather than undo their freeze.
        self._thaw = gc.get_freeze_count() == 0
        # Only root mode prebuilds: a rootless container's namespaces belong to its user namespace,
        # which exists only once the container does.
        self._want_pool = prebuild and not rootless
        self._pool: NamespacePool | None = None
        #: Root mode: the identity-mapped user namespace children join when the pool has none ready.
        self._userns_fd = -1
        self._prefork = prefork
        self._prefault = prefault
        self._nice = os.getpriority(os.PRIO_PROCESS, 0)
        #: Forks the containers of a run of tests with the same key (see zygote.py).
        self._zygote: Zygote | None = None
        #: The key of the last warm-capable run: a zygote is made for the second test with a key.
        self._last_key: object = None
        #: Why containers stopped coming from zygotes, if they did.
        self.prefork_broken: str | None = None

    def pool(self) -> NamespacePool | None:
        if self._pool is None and self._want_pool:
            self._pool = NamespacePool()
        return self._pool if self._pool is not None and self._pool.broken is None else None

    def userns(self) -> int:
        """One user namespace for the session's children that build their own root (one fork, once)."""
        if self._userns_fd < 0:
            self._userns_fd = namespaces.make_userns()
        return self._userns_fd

    def close(self) -> None:
        self.quiesce()
        spare, self._spare = self._spare, None
        if spare is not None:
            _remove(spare[2])
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for fd in (self._pidns_fd, self._diag_fd, self._userns_fd):
            if fd >= 0:
                os.close(fd)
        self._pidns_fd = self._diag_fd = self._userns_fd = -1

    @property
    def unreaped(self) -> bool:
        """Whether any child of ours may still exist: finished containers, the zygote, the pool's helper."""
        return bool(self._unreaped) or self._zygote is not None or self._pool is not None

    def quiesce(self) -> None:
        """Leave no child of ours running: stop the zygote (it ends its containers first) and the pool, reap all.

        Before a test that runs in pytest's own process: one that waits for any
        child (a supervisor's test) must find only its own.  Both start again
        when the next container is asked for.
        """
        self._stop_zygote()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.reap(block=True)

    def _stop_zygote(self) -> None:
        if self._zygote is not None:
            self._zygote.stop()
            self._unreaped.append((self._zygote.pid, None))
            self._zygote = None

    def reap(self, block: bool = False) -> None:
        """Collect finished containers and remove their cgroups; with ``block``, wait for all of them."""
        still: list[tuple[int, cgroup.Cgroup | None]] = []
        for pid, group in self._unreaped:
            try:
                done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done = pid
            if not done:
                still.append((pid, group))
            elif group is not None:
                _remove(group)
        self._unreaped = still
        emptying, self._emptying = self._emptying, []
        for warm_group in emptying:
            if block or not warm_group.procs():
                _remove(warm_group)  # with block: the zygote was stopped and reaped, its containers with it
            else:
                self._emptying.append(warm_group)

    def run(
        self,
        spec: ContainerSpec,
        body: Body,
        on_frame: OnFrame,
        need_status: bool = False,
        warm: Warm | None = None,
    ) -> Outcome:
        """Run ``body`` as PID 1 of a container built from ``spec``, to its end.

        With ``warm``, the container may come from a zygote instead, built
        ahead of time and running ``warm.factory(warm.order)`` in place of
        ``body``: the caller promises they do the same.
        """
        group = None
        if spec.limits or spec.usage:
            group = self._take_spare(spec)
            if group is None:
                try:
                    group = cgroup.manager().create(spec.id, spec.limits, spec.usage)
                except (cgroup.CgroupError, OSError) as exc:
                    return Outcome("error", payload=f"could not create the container's cgroup: {exc}")
        try:
            if warm is not None and not need_status and self._warm_allowed(spec):
                outcome = self._run_warm(spec, warm, on_frame, group)
                if outcome is not None:
                    return outcome
            return self._run(spec, body, on_frame, need_status, group)
        except BaseException:
            if group is not None:
                _remove(group)
            raise

    def _run(
        self, spec: ContainerSpec, body: Body, on_frame: OnFrame, need_status: bool, group: cgroup.Cgroup | None
    ) -> Outcome:
        # privileged=True wants host root's own namespaces, which the pool does not build.
        pool = None if spec.privileged else self.pool()
        prepared = pool.take(spec.plan_key) if pool is not None else None
        userns_fd = -1
        if prepared is None and not spec.rootless and not spec.privileged:
            try:
                userns_fd = self.userns()
            except OSError as exc:
                return Outcome("error", payload=f"could not create the container's user namespace: {exc}")
        read_fd, write_fd = os.pipe()
        try:
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass
        os.ftruncate(self._diag_fd, 0)
        os.lseek(self._diag_fd, 0, os.SEEK_SET)
        cgroup_fds = tuple(group.attach_fds()) if group is not None else ()
        launch = init.Launch(
            spec=spec,
            body=body,
            uid=os.getuid(),
            gid=os.getgid(),
            parent_pid=os.getpid(),
            write_fd=write_fd,
            diag_fd=self._diag_fd,
            joins=prepared.joins if prepared is not None else (),
            notes=prepared.notes if prepared is not None else (),
            cgroup_fds=cgroup_fds,
            userns_fd=userns_fd,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = self._fork(launch, read_fd)
        finally:
            os.close(write_fd)
            for fd in cgroup_fds:
                os.close(fd)
        # The child holds its own references now; build the next container's while this one runs.
        if prepared is not None:
            prepared.close()
        if pool is not None:
            pool.prefetch(spec.plan_key, spec.plan)
        # While the child starts on another core: collect finished containers, and make the next
        # test's cgroup (most likely it asks for the same limits as this one).
        self.reap()
        if group is not None:
            self._make_spare(spec)
        return self._follow(spec, pid, read_fd, on_frame, need_status=need_status, group=group)

    def _warm_allowed(self, spec: ContainerSpec) -> bool:
        return self._prefork and self.prefork_broken is None and eligible(spec)

    def _run_warm(
        self, spec: ContainerSpec, warm: Warm, on_frame: OnFrame, group: cgroup.Cgroup | None
    ) -> Outcome | None:
        """A container from the zygote for ``warm.key``; None: fork this one directly.

        With cgroup limits (root mode), the container is moved into its cgroup
        before it is handed its test: what it copied while it waited stays
        charged to pytest's own cgroup, a few MiB the limit does not count.
        """
        key = (warm.key, spec.keep_fds)
        if self._zygote is not None and self._zygote.key != key:
            self._stop_zygote()
        if self._zygote is None:
            if self._last_key != key:
                # Only the second test with a key gets a zygote: a lone test would pay for it and gain nothing.
                self._last_key = key
                return None
            try:
                userns_fd = -1 if self.rootless else self.userns()
                self._zygote = Zygote.start(
                    key, warm.factory, self._diag_fd, userns_fd, spec.keep_fds, prefault=self._prefault
                )
            except OSError as exc:
                self.prefork_broken = f"cannot fork a zygote: {exc}"
                return None
        owner = self._zygote
        try:
            pid, go_fd, read_fd = owner.take(spec)
        except ZygoteError as exc:
            self.prefork_broken = str(exc)
            self._stop_zygote()
            return None
        if group is not None:
            try:
                group.attach(pid)
            except cgroup.CgroupError as exc:
                os.close(go_fd)  # no GO: it exits without running anything
                os.close(read_fd)
                return Outcome("error", payload=f"could not move the container into its cgroup: {exc}")
        os.ftruncate(self._diag_fd, 0)
        os.lseek(self._diag_fd, 0, os.SEEK_SET)
        with contextlib.suppress(OSError):  # built at low priority; runs its test at ours (root only)
            os.setpriority(os.PRIO_PROCESS, pid, self._nice)
        try:
            protocol.write_all(go_fd, protocol.encode(protocol.Kind.GO, (spec.tail(), warm.order)))
        except OSError:
            pass  # it died while it waited: what it said, if anything, is in the stream
        finally:
            os.close(go_fd)
        with contextlib.suppress(ZygoteError):  # the next test finds out, and forks its own container
            owner.prefetch(spec)
        self.reap()
        if group is not None:
            self._make_spare(spec)
        return self._follow(spec, pid, read_fd, on_frame, group=group, owner=owner)

    def _follow(
        self,
        spec: ContainerSpec,
        pid: int,
        read_fd: int,
        on_frame: OnFrame,
        *,
        need_status: bool = False,
        group: cgroup.Cgroup | None = None,
        owner: Zygote | None = None,
    ) -> Outcome:
        """Read a started container's frames to the end; ``owner``: the zygote whose child it is."""
        start = time.monotonic()
        outcome = Outcome("crashed", host_pid=0 if self.rootless else pid)
        deadline = start + spec.timeout + TIMEOUT_GRACE if spec.timeout else None
        try:
            self._read(read_fd, outcome, on_frame, deadline)
        except BaseException:
            process.kill(pid, outcome.host_pid)
            if owner is None:
                os.waitpid(pid, 0)
            raise
        finally:
            os.close(read_fd)
        outcome.elapsed = time.monotonic() - start
        if outcome.kind == "timeout":
            process.kill(pid, outcome.host_pid)
        if group is not None:
            # Read while PID 1 still lives; the cgroup goes once the container is reaped.
            if spec.usage:
                outcome.usage = group.usage()
            outcome.oom_killed = bool(spec.limits.memory) and group.oom_killed()
        if outcome.kind in ("crashed", "timeout", "error") or need_status:
            if owner is not None:
                outcome.exitstatus = owner.exit_code(pid)
            else:
                _, status = os.waitpid(pid, 0)
                outcome.exitstatus = os.waitstatus_to_exitcode(status)
            if group is not None:
                _remove(group)
        elif owner is None:
            # Namespace teardown happens as the child exits; nobody needs to wait for it here.
            self._unreaped.append((pid, group))
        elif group is not None:
            self._emptying.append(group)  # the zygote reaps it; the cgroup goes once it is empty
        if outcome.kind in ("crashed", "timeout"):
            size = os.fstat(self._diag_fd).st_size
            outcome.diag = os.pread(self._diag_fd, size, 0).decode("utf-8", "replace") if size else ""
            if outcome.kind == "crashed" and spec.timeout and outcome.diag.startswith("Timeout ("):
                outcome.kind = "timeout"
        return outcome

    def _take_spare(self, spec: ContainerSpec) -> cgroup.Cgroup | None:
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        limits, usage, group = spare
        if limits == spec.limits and usage == spec.usage:
            return group
        _remove(group)
        return None

    def _make_spare(self, spec: ContainerSpec) -> None:
        if self._spare is not None:
            return
        with contextlib.suppress(cgroup.CgroupError, OSError):  # the next test makes its own, and says why
            group = cgroup.manager().create(os.urandom(6).hex(), spec.limits, spec.usage)
            self._spare = (spec.limits, spec.usage, group)

    def _fork(self, launch: init.Launch, read_fd: int) -> int:
        # Frozen objects stay out of the child's GC, which would otherwise write-fault on pages all
        # over the heap.  gc.freeze() and gc.unfreeze() are O(1); gc.get_freeze_count() walks the
        # whole frozen list, so it is asked once, in __init__ (70 instead of 17 ms per test with
        # 200 MB frozen).
        gc.freeze()
        try:
            if self._pidns_fd >= 0:
                # One fork instead of two: our next child becomes PID 1 of a new namespace.
                sc.unshare(sc.CLONE_NEWPID)
            try:
                pid = sc.fork()
            finally:
                if self._pidns_fd >= 0 and os.getpid() != 1:
                    sc.setns(self._pidns_fd, sc.CLONE_NEWPID)
            if pid == 0:
                os.close(read_fd)
                init.main(launch)
        finally:
            if self._thaw:
                gc.unfreeze()
        return pid

    def _read(self, fd: int, outcome: Outcome, on_frame: OnFrame, deadline: float | None) -> None:
        reader = protocol.FrameReader()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outcome.kind = "timeout"
                    return
                if not poller.poll(remaining * 1000):
                    continue
            try:
                data = os.read(fd, _PIPE_SIZE)
            except OSError as exc:  # pragma: no cover - a pipe read does not fail short of EINTR
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not data:
                if reader.pending:
                    outcome.payload = f"the container died in the middle of a {reader.pending}-byte message"
                return
            try:
                frames = reader.feed(data)
            except protocol.ProtocolError as exc:
                outcome.payload = f"garbled message from the container: {exc}"
                return
            for kind, payload in frames:
                terminal = _TERMINAL_KINDS.get(kind)
                if terminal is not None:
                    outcome.kind = terminal
                    outcome.payload = payload
                    return
                if kind is protocol.Kind.HELLO:
                    outcome.host_pid = int(payload["host_pid"])
                else:
                    on_frame(kind, payload)
