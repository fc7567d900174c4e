"""uffd-wp backend: userfaultfd write-protect in async mode, read and re-armed by PAGEMAP_SCAN.

The agent injects userfaultfd() into the target (the fd must belong to the target's mm), takes
a duplicate with pidfd_getfd, and from then on works from outside: it registers the tracked
VMAs in write-protect mode; the kernel resolves each first write itself (WP_ASYNC: the target
never blocks) and clears the page's protection; PAGEMAP_SCAN with PM_SCAN_WP_MATCHING reports
the unprotected ("written") pages and protects them again in one atomic walk.
"""
from __future__ import annotations

import errno
import os

from .. import procfs, remote
from ..kernel import pagemap, pidfd, seccomp, userfaultfd as uffd
from ..kernel.pagemap import (PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN, PAGE_SIZE,
                              PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING)
from ..procfs import Mapping
from .base import Availability, Backend, ProcessSample, TargetGone, TrackingError
from .pages import PageRanges
from .state import Claim, TargetState
from .vmas import VmaEvent, VmaSelection, ranges_of

UFFD_LINK = "anon_inode:[userfaultfd]"
ANONYMOUS_KINDS = ("anon", "heap", "stack")  # private anonymous memory: no page cache behind it
_ALLOWED = (seccomp.RET_ALLOW, seccomp.RET_LOG)


class UffdWp(Backend):
    name = "uffd-wp"

    def __init__(self, pid: int, selection: VmaSelection):
        super().__init__(pid, selection)
        self._target_fd = -1  # the injected userfaultfd, in the target's fd table
        self._uffd = -1  # our duplicate of it
        self._pagemap = -1
        self._scanner: pagemap.Scanner | None = None
        self._pending = PageRanges()  # collected by an earlier run but never saved
        self._prepared_for: PageRanges | None = None  # the parent prepare_hand_over() readied for

    @classmethod
    def availability(cls) -> Availability:
        from ..kernel.arch import ARCH
        if not ARCH.can_inject:
            return Availability(False, f"userfaultfd injection is not implemented on {ARCH.name}")
        if not pagemap.scan_supported():
            return Availability(False, "the kernel lacks the PAGEMAP_SCAN ioctl (Linux 6.7+)")
        try:
            features = _probe_features()
        except OSError as exc:
            return Availability(False, f"userfaultfd unavailable: {exc.strerror} "
                                       "(CONFIG_USERFAULTFD off, or blocked by seccomp)")
        if features & uffd.TRACKING_FEATURES != uffd.TRACKING_FEATURES:
            return Availability(False, "userfaultfd lacks WP_ASYNC/WP_UNPOPULATED "
                                       "(Linux 6.7+ with CONFIG_PTE_MARKER_UFFD_WP)")
        return Availability(True, "userfaultfd async write-protect and PAGEMAP_SCAN present")

    # Lifecycle

    def _arm(self) -> PageRanges:
        self._open_pagemap()
        ours = procfs.fds_pointing_to(os.getpid(), UFFD_LINK)  # every target this process tracks
        foreign = [fd for fd in procfs.fds_pointing_to(self.pid, UFFD_LINK)
                   if not any(_same_file(os.getpid(), mine, self.pid, fd) for mine in ours)]
        if foreign:
            raise TrackingError(f"pid {self.pid} already uses userfaultfd (fd {foreign[0]}); "
                                "uffd-wp tracking would conflict with it")
        self._inject()
        self._save_state()
        # A forked child of a tracked process holds a copy of its parent's injected fd.
        close_copies(self.pid, ours, skip_fd=self._target_fd)
        now, _ = self.refresh_vmas()
        baseline = self._start_tracking(now, PageRanges())
        self.tracked = [m for m in now if _key(m) not in self.skipped]
        return baseline

    def collect(self) -> ProcessSample:
        if not self.mm_alive(self._pagemap):
            return self._rearm_after_exec()
        now, events = self.refresh_vmas()
        known = self.tracked_ranges()
        dirty: list[PageRanges] = []
        fresh: list[Mapping] = []
        for m in now:
            armed = known.intersection(PageRanges([(m.start, m.end)]))
            try:
                dirty += [self._scan_written(start, end) for start, end in armed]
            except OSError as exc:
                if exc.errno != errno.EPERM:
                    raise
                # CHECK_WPASYNC: part of this range is no longer registered, so the VMA was
                # replaced behind our back (munmap + mmap at the same place): start it afresh.
                known = known.difference(PageRanges([(m.start, m.end)]))
                events.append(VmaEvent("replaced", m.start, m.end, m.path))
            if not known.covers(m.start, m.end):
                fresh.append(m)
        dirty.append(self._start_tracking(fresh, known))
        self.tracked = [m for m in now if _key(m) not in self.skipped]
        dirty.append(self._pending)
        self._pending = PageRanges()
        return ProcessSample(self.pid, PageRanges().union(*dirty), self.tracked, events,
                             skipped=dict(self.skipped))

    def close(self) -> None:
        """Unregister every armed VMA, close the injected fd in the target (and in children
        that inherited it), then drop our own descriptors."""
        try:
            if self._uffd >= 0 and procfs.alive(self.pid, self.starttime):
                release_target(self.pid, self._uffd, self._target_fd)
        finally:
            self._drop_fds()
            self.release_claim()

    def drop_target_fd(self) -> None:
        """Close the injected fd inside the target (and its children) but keep tracking through
        our duplicate, for as long as this process holds it (CRIU cannot dump a userfaultfd)."""
        for pid in [self.pid] + procfs.descendants(self.pid):
            close_copies(pid, [self._uffd])
        self._target_fd = -1
        self._save_state()

    def hand_over(self, holds: PageRanges) -> None:
        """Ready a frozen target for `criu dump --track-mem-uffd` against a parent holding
        `holds` (written() then tells the tracked pages CRIU counts as written).

        CRIU takes a write-protected page as clean and expects the parent to hold it, so the
        protection is dropped where that is not so: pages the parent lacks (collected but never
        saved, or not in the baseline) and protection markers, which read as swapped but hold
        no data (never-populated pages; in shared and file mappings also discarded ones, whose
        old data the parent must not bring back). Nothing is re-protected: CRIU sees every
        write since the last layer.

        After prepare_hand_over(holds) only what can have changed since is left to do here:
        markers that discards left in file and shared mappings.
        """
        tracked = self.tracked_ranges()
        if self._prepared_for is not None and self._prepared_for == holds:
            self._unprotect(self._discarded(self._non_anonymous().intersection(tracked), holds))
        else:
            self._unprotect(self._not_held(tracked, holds))
        self._prepared_for = None

    def written(self) -> PageRanges:
        """After hand_over(), until the next collect(): the tracked pages CRIU counts as
        written (it never re-protects, so this may be read after its dump: a page walk the
        freeze need not wait for)."""
        return PageRanges().union(*(self._written(start, end) for start, end in self.tracked_ranges()))

    def prepare_hand_over(self, holds: PageRanges) -> None:
        """Most of hand_over(holds), done while the target still runs, so that the freeze need
        not walk every page: a page unprotected here reads as written from then on, and what
        the target does meanwhile cannot protect a page again (only this tracker does), except
        a discard in a file or shared mapping, which leaves a marker that hand_over() drops."""
        self._unprotect(self._not_held(self.tracked_ranges(), holds))
        self._prepared_for = holds

    def _not_held(self, tracked: PageRanges, holds: PageRanges) -> PageRanges:
        """The protected pages in tracked that CRIU must not take from the parent."""
        with_data = self.pages_with(self._scanner, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, tracked)
        return self._pending.union(with_data.difference(holds), self._discarded(tracked, holds))

    def _discarded(self, ranges: PageRanges, holds: PageRanges) -> PageRanges:
        """Protection markers among the pages of ranges that the parent holds."""
        swapped_clean = PageRanges((s, e) for start, end in ranges for s, e, _ in self._scanner.scan(
            start, end, category_mask=PAGE_IS_SWAPPED | PAGE_IS_WRITTEN, inverted=PAGE_IS_WRITTEN,
            return_mask=PAGE_IS_SWAPPED))
        return self._markers(swapped_clean.intersection(holds))

    def _non_anonymous(self) -> PageRanges:
        """Tracked file and shared mappings: a discard there leaves a marker (an anonymous
        mapping's discard drops the page and its protection)."""
        return ranges_of([m for m in self.tracked if m.kind not in ANONYMOUS_KINDS])

    def _unprotect(self, pages: PageRanges) -> None:
        mapped = PageRanges((m.start, m.end) for m in procfs.read_maps(self.pid))
        for start, end in pages.intersection(self.tracked_ranges()).intersection(mapped):
            try:
                uffd.write_protect(self._uffd, start, end, protect=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EINVAL):
                    raise  # else no longer registered: CRIU dumps all of it anyway

    def _markers(self, ranges: PageRanges) -> PageRanges:
        """The pages in `ranges` that hold a pte marker (few: discarded or swapped pages)."""
        found = []
        for start, end in ranges:
            entries = pagemap.read_entries(self._pagemap, start, end)
            found += [(start + i * PAGE_SIZE, start + (i + 1) * PAGE_SIZE)
                      for i, entry in enumerate(entries) if pagemap.is_marker(entry)]
        return PageRanges(found)

    def _written(self, start: int, end: int) -> PageRanges:
        """Written pages with data in [start, end), as CRIU counts them (never-populated pages
        read as written once unprotected; the zero page holds nothing), not re-protected.
        First "written" alone, which the kernel answers by testing one pte bit a page (~0.4 ns
        against ~16 for the full question); it also reports pages without data, so the full
        question is asked over what it reports, usually a small part of memory."""
        candidates = list(self._scanner.scan(start, end, category_mask=PAGE_IS_WRITTEN,
                                             return_mask=PAGE_IS_WRITTEN))  # one vec: read it all first
        return PageRanges((s, e) for cs, ce, _ in candidates for s, e, _ in self._scanner.scan(
            cs, ce, category_mask=PAGE_IS_WRITTEN | PAGE_IS_PFNZERO, inverted=PAGE_IS_PFNZERO,
            anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED, return_mask=PAGE_IS_WRITTEN))

    def park(self, pending: PageRanges = PageRanges()) -> None:
        state = self._state("parked")
        state.ranges = [list(r) for r in self.tracked_ranges()]
        state.pending = [list(r) for r in pending.union(self._pending)]
        self._claim.save(state)
        self._drop_fds()
        self.release_claim(keep_state=True)

    @classmethod
    def resume(cls, pid: int, selection: VmaSelection) -> UffdWp:
        self = cls(pid, selection)
        self._claim = Claim(pid, self.starttime)
        try:
            state = self._claim.load()
            if state is None or state.mode != "parked" or state.backend != cls.name:
                raise TrackingError(f"pid {pid} has no parked {cls.name} tracking to resume")
            self._target_fd = state.target_fd
            self._uffd = _dup_target_fd(pid, state.target_fd)
            self._open_pagemap()
            armed = PageRanges(tuple(r) for r in state.ranges)
            self._pending = PageRanges(tuple(r) for r in state.pending)
            self.tracked = [m for m in self.selection.select(pid) if armed.covers(m.start, m.end)]
            self._save_state()
            return self
        except BaseException:
            self.close()
            raise

    # Steps

    def _open_pagemap(self) -> None:
        self._pagemap = self.open_pagemap()
        self._scanner = pagemap.Scanner(self._pagemap)

    def _inject(self) -> None:
        flags = uffd.O_CLOEXEC | uffd.O_NONBLOCK
        status = procfs.read_status(self.pid)
        if not procfs.has_capability(status, procfs.CAP_SYS_PTRACE) and not _unprivileged_allowed():
            # Without CAP_SYS_PTRACE the target may only create a user-mode-only userfaultfd.
            # Writes the kernel makes on its behalf (read() into tracked memory) still count.
            flags |= uffd.UFFD_USER_MODE_ONLY
        try:
            with remote.Session(self.pid) as session:
                for call, args in (("userfaultfd", (flags,)), ("close", (0,))):
                    action = session.seccomp_verdict(call, *args)
                    if action not in _ALLOWED:
                        raise TrackingError(
                            f"pid {self.pid}'s seccomp filter would {seccomp.ACTION_NAMES.get(action, hex(action))} "
                            f"on {call}(); uffd-wp tracking cannot inject it")
                fd = session.call("userfaultfd", flags)
                if fd == -errno.EPERM and not flags & uffd.UFFD_USER_MODE_ONLY:
                    flags |= uffd.UFFD_USER_MODE_ONLY
                    fd = session.call("userfaultfd", flags)
        except remote.RemoteError as exc:
            raise TrackingError(str(exc)) from None
        if fd < 0:
            raise TrackingError(f"userfaultfd() in pid {self.pid} failed: {os.strerror(-fd)}")
        self._target_fd = fd
        try:
            self._uffd = _dup_target_fd(self.pid, fd)
            uffd.api(self._uffd, uffd.TRACKING_FEATURES | _shmem_feature())
        except OSError as exc:
            release_target(self.pid, self._uffd, fd)
            self._target_fd = self._uffd = -1
            raise TrackingError(f"cannot set up userfaultfd for pid {self.pid}: {exc}") from None

    def _start_tracking(self, maps: list[Mapping], known: PageRanges) -> PageRanges:
        """Register and write-protect the parts of `maps` not yet armed; returns their pages
        with data (all of it counts as written: it appeared since the last look)."""
        found = []
        for m in maps:
            try:
                uffd.register_wp(self._uffd, m.start, m.end)
            except OSError as exc:
                self.skipped[_key(m)] = f"{m.kind} mapping {m.path or '(anon)'}: {exc.strerror}"
                continue
            self.skipped.pop(_key(m), None)
            for start, end in PageRanges([(m.start, m.end)]).difference(known):
                found.append(self._protect_and_list(start, end))
        return PageRanges().union(*found)

    def _scan_written(self, start: int, end: int) -> PageRanges:
        return PageRanges((s, e) for s, e, _ in self._scanner.scan(
            start, end, flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN))

    def _protect_and_list(self, start: int, end: int) -> PageRanges:
        """Write-protect [start, end) and return its pages that hold data.

        Protection markers on never-populated pages read as "swapped" in pagemap, so swapped
        pages are listed before protecting, present ones after: a page populated in between
        is present afterwards, and every write after protecting is caught by the next round.
        """
        swapped_or_present = self.pages_with(self._scanner, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, [(start, end)])
        uffd.write_protect(self._uffd, start, end)
        return swapped_or_present.union(self.pages_with(self._scanner, PAGE_IS_PRESENT, [(start, end)]))

    def _rearm_after_exec(self) -> ProcessSample:
        self.check_alive()
        old = self.tracked
        self._drop_fds()  # the old mm is gone, and with it every registration
        self.tracked, self.skipped = [], {}
        baseline = self._arm()
        events = [VmaEvent("exec", 0, 0, procfs.read_stat(self.pid).comm)]
        events += [VmaEvent("removed", m.start, m.end, m.path) for m in old]
        events += [VmaEvent("added", m.start, m.end, m.path) for m in self.tracked]
        return ProcessSample(self.pid, baseline, self.tracked, events, skipped=dict(self.skipped))

    def _state(self, mode: str) -> TargetState:
        return TargetState(self.pid, self.starttime, self.name, mode, target_fd=self._target_fd)

    def _save_state(self) -> None:
        self._claim.save(self._state("active"))

    def _drop_fds(self) -> None:
        for fd in (self._uffd, self._pagemap):
            if fd >= 0:
                os.close(fd)
        self._uffd = self._pagemap = -1
        self._scanner = None


def release_target(pid: int, our_fd: int, target_fd: int) -> None:
    """Undo everything memsnap put in the target: protection, registrations, the fd and its
    inherited copies in descendants. Also how a killed tracker's leftovers are cleaned."""
    try:
        armed = [m for m, flags in procfs.read_vmflags(pid) if "uw" in flags]
    except (FileNotFoundError, ProcessLookupError):
        return
    for m in armed:
        try:
            uffd.unregister(our_fd, m.start, m.end)  # also clears the pages' write-protection
        except OSError:
            pass  # not ours, or gone meanwhile
    for p in [pid] + procfs.descendants(pid):
        close_copies(p, [our_fd])


def close_copies(pid: int, our_fds: list[int], skip_fd: int = -1) -> None:
    """Close, inside pid, every descriptor that is the same open file as one of our_fds."""
    mine = os.getpid()
    theirs = [fd for fd in procfs.fds_pointing_to(pid, UFFD_LINK)
              if fd != skip_fd and any(_same_file(mine, ours, pid, fd) for ours in our_fds)]
    if not theirs:
        return
    try:
        with remote.Session(pid) as session:
            for fd in theirs:
                session.call("close", fd)
    except (remote.RemoteError, ProcessLookupError):
        pass  # the process is exiting: its descriptors go with it


def release_stale(state: TargetState) -> None:
    """Clean a target left armed by a tracker that was killed."""
    try:
        our_fd = _dup_target_fd(state.pid, state.target_fd)
    except TrackingError:
        return  # the fd is gone (the target closed it or exec'd): nothing is left armed
    try:
        release_target(state.pid, our_fd, state.target_fd)
    finally:
        os.close(our_fd)


def _dup_target_fd(pid: int, target_fd: int) -> int:
    """Our own descriptor of the userfaultfd the target holds as target_fd. TargetGone when the
    target exited, or is exiting: its descriptors are closed before it becomes a zombie."""
    if procfs.fd_target(pid, target_fd) != UFFD_LINK:
        if not _has_fds(pid):
            raise TargetGone(f"pid {pid} exited or is exiting (its descriptors are gone)")
        raise TrackingError(f"pid {pid}'s fd {target_fd} is no longer a userfaultfd")
    try:
        pfd = pidfd.pidfd_open(pid)
    except ProcessLookupError:
        raise TargetGone(f"pid {pid} exited") from None
    try:
        return pidfd.pidfd_getfd(pfd, target_fd)
    except PermissionError:
        raise TrackingError(f"not permitted to take pid {pid}'s fd (pidfd_getfd): needs root "
                            "or CAP_SYS_PTRACE") from None
    except ProcessLookupError:
        raise TargetGone(f"pid {pid} exited") from None
    finally:
        os.close(pfd)


def _has_fds(pid: int) -> bool:
    try:
        return bool(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return False


def _same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    try:
        return pidfd.same_file(pid1, fd1, pid2, fd2)
    except OSError:
        return False


def _probe_features() -> int:
    try:
        fd = uffd.create(uffd.O_CLOEXEC | uffd.O_NONBLOCK)
    except PermissionError:
        fd = uffd.create(uffd.O_CLOEXEC | uffd.O_NONBLOCK | uffd.UFFD_USER_MODE_ONLY)
    try:
        return uffd.api(fd, 0)
    finally:
        os.close(fd)


_features_cache: list[int] = []


def _shmem_feature() -> int:
    """WP on shmem/hugetlbfs, when the kernel has it (needed for shared-* VMA kinds)."""
    if not _features_cache:
        _features_cache.append(_probe_features())
    return _features_cache[0] & uffd.FEATURE_WP_HUGETLBFS_SHMEM


def _unprivileged_allowed() -> bool:
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _key(m: Mapping) -> str:
    return f"{m.start:x}-{m.end:x}"
