"""Start one node's init: run as ``python -m memsnap.nodes.boot CONFIG_JSON`` by runtime.start().

This process joins the node's cgroups, unshares the mount, UTS, IPC, network, PID and cgroup
namespaces, and forks the node's PID 1, which mounts the node's root (overlayfs over the image),
pivot_roots into it and execs ``memsnap-node-init``. The parent prints PID 1's host PID once the
exec succeeded (or the child's error) and exits; init lives on, reparented.

The host python may be 3.11 (no os.unshare), hence ctypes.
"""
from __future__ import annotations

import ctypes
import json
import os
import stat
import sys
from pathlib import Path

from memsnap.kernel.arch import ARCH
from memsnap.kernel.libc import check as _check
from memsnap.kernel.libc import libc as _libc
from memsnap.kernel.libc import mount
from memsnap.nodes import cgroups

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

INIT = "/usr/local/sbin/memsnap-node-init"
NODE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

# Character devices of the node's /dev: name -> (major, minor).
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}

def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(ctypes.c_long(ARCH.nr["pivot_root"]), new_root.encode(), put_old.encode()), "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def mount_root(cfg: dict) -> Path:
    """Mount the node's whole tree at cfg['merged'] (still in the host's view)."""
    root = Path(cfg["merged"])
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    mount("overlay", root, "overlay", 0,
          f"lowerdir={cfg['lower']},upperdir={cfg['upper']},workdir={cfg['work']}")
    checkout = root / cfg["checkout_mount"].lstrip("/")
    mount(cfg["checkout"], checkout, None, MS_BIND | MS_REC)
    mount(None, checkout, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    mount("proc", root / "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # Read-only: the node's sysfs shows its own net devices but writes would reach the host kernel.
    mount("sysfs", root / "sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount_cgroups(root / "sys/fs/cgroup", cfg["cgroups"])
    mount_dev(root / "dev")
    mount("tmpfs", root / "tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", root / "run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    return root


def mount_cgroups(target: Path, kinds: list[str]) -> None:
    """The node's own cgroups, writable, at the usual places: tools in the node (CRIU's
    --freeze-cgroup, a sub-cgroup per workload) can use them. Thanks to the cgroup namespace each
    hierarchy's root is the node's cgroup."""
    v1 = [k for k in kinds if k != "cgroup2"]
    if not v1:  # a cgroup2-only host (typical Debian 13)
        if kinds:
            mount("cgroup2", target, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755")
    for kind in kinds:
        sub = target / ("unified" if kind == "cgroup2" else kind.removeprefix("name="))
        sub.mkdir()
        if kind == "cgroup2":
            mount("cgroup2", sub, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        else:
            mount("cgroup", sub, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, kind)


def mount_dev(dev: Path) -> None:
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=16m")
    for name, (major, minor) in DEVICES.items():
        os.mknod(dev / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)  # mknod is subject to the umask
    (dev / "net").mkdir()
    os.mknod(dev / "net/tun", stat.S_IFCHR | 0o666, os.makedev(10, 200))  # criu check probes it
    os.chmod(dev / "net/tun", 0o666)
    (dev / "pts").mkdir()
    mount("devpts", dev / "pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5")
    (dev / "shm").mkdir()
    mount("tmpfs", dev / "shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for link, target in {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
                         "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}.items():
        os.symlink(target, dev / link)


def enter_root(root: Path) -> None:
    """pivot_root into root and drop the host's tree (the pivot_root(".", ".") idiom)."""
    os.chdir(root)
    pivot_root(".", ".")
    mount(None, ".", None, MS_REC | MS_PRIVATE)
    _check(_libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "umount old root")
    os.chdir("/")


def exec_init(keep_fd: int) -> None:
    """Exec init with /dev/null as stdin, a log in the node's /run, and no other fd but keep_fd.

    No fd from the host may survive into the node: CRIU refuses to dump a task holding one.
    """
    null = os.open("/dev/null", os.O_RDWR)
    log = os.open("/run/memsnap-node-init.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, os.sysconf("SC_OPEN_MAX"))
    os.execve(INIT, [INIT], NODE_ENV)


def child(cfg: dict, errfd: int) -> None:
    try:
        root = mount_root(cfg)
        sethostname(cfg["name"])
        enter_root(root)
        exec_init(errfd)  # on success errfd closes by O_CLOEXEC: the parent reads EOF
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent
        os.write(errfd, f"{type(exc).__name__}: {exc}".encode())
    finally:
        os._exit(1)


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    cgroups.join(cfg["name"])  # before unsharing, so the cgroup namespace is rooted at the node's cgroup
    unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWCGROUP)
    rfd, wfd = os.pipe()  # both O_CLOEXEC (PEP 446)
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        child(cfg, wfd)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        err = r.read().decode(errors="replace")
    if err:
        os.waitpid(pid, 0)
        print(f"node {cfg['name']}: {err}", file=sys.stderr)
        return 1
    print(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
