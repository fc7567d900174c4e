"""The cluster's binaries, built from Debian 12's `kubernetes` source package and cached by input hash.

Debian ships no kube-apiserver, kubelet or pause image, but Debian 12's source package holds the
whole 1.20.2 tree with vendor/. We build it offline inside a Debian 12 root (debootstrap, so the
host's distribution does not matter) with Debian 12's Go: one ``make WHAT="..."`` for all four
commands (they share the code-generation step), plus the static pause binary (packed as an image
at `up`, by oci.py).

Layout under ``/var/cache/memsnap/kubernetes``::

    root-<hash>/   the Debian 12 build root (Go and the tools; each build unpacks the source in it
                   and removes it again, ~3 GB while it builds)
    <hash>/        bin/{kube-apiserver,...,kubectl,etcd,pause}, manifest.json, build.log

``<hash>`` covers the pinned versions and the scripts run in the root; a build happens in
``.build-<hash>-<pid>`` and is renamed into place, so a published build is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from memsnap.cluster import oci
from memsnap.filelock import locked

Log = Callable[[str], None]

SUITE = "bookworm"
SOURCE_PACKAGE = "kubernetes"
SOURCE_VERSION = "1.20.5+really1.20.2-1.1+deb12u1"  # Debian 12's; its tree is v1.20.2
GIT_VERSION = "v1.20.2"
GIT_COMMIT = "faecb196815e248d3ecfb03c680a4507229c2a56"  # upstream v1.20.2
COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
ROOT_PACKAGES = ("golang-go", "golang-github-modern-go-reflect2-dev", "make", "gcc", "libc6-dev",
                 "dpkg-dev", "rsync", "git", "ca-certificates", "xz-utils", "etcd-server")
# Taken from the root as they are: Debian 12's etcd for the control plane (not installed on the
# host, where its package would start a system-wide etcd service).
ROOT_BINARIES = ("/usr/bin/etcd",)
PAUSE_IMAGE = "memsnap.local/pause:3.4.1"
# Bump when a build step changes in a way this file's text does not show (it is hashed anyway).
BUILD_FORMAT = 1

CACHE_DIR = Path(os.environ.get("MEMSNAP_KUBE_CACHE", "/var/cache/memsnap/kubernetes"))
SRC = "/build/gopath/src/k8s.io/kubernetes"  # inside the root: kube's make wants a GOPATH layout


class BuildError(Exception):
    """The cluster's binaries could not be built (the message names the step and its log)."""


@dataclass(frozen=True)
class Build:
    digest: str
    path: Path

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name

    def write_pause_image(self, path: Path) -> Path:
        """The pause binary as the image containerd's sandboxes run (a docker-archive at path)."""
        oci.write_docker_archive(path, PAUSE_IMAGE, {"pause": self.bin("pause")},
                                 entrypoint=["/pause"], user="65535:65535")
        return path


def digest() -> str:
    """Hash of every build input: versions, packages, the scripts run in the root."""
    spec = [BUILD_FORMAT, SUITE, SOURCE_PACKAGE, SOURCE_VERSION, GIT_VERSION, GIT_COMMIT, COMMANDS, ROOT_PACKAGES,
            ROOT_BINARIES, PAUSE_IMAGE, _FETCH_SCRIPT, _MAKE_SCRIPT, _PAUSE_FLAGS, sorted(_go_env().items())]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _root_key() -> str:
    spec = json.dumps([SUITE, ROOT_PACKAGES])
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def cached() -> Build | None:
    d = digest()
    path = CACHE_DIR / d
    return Build(d, path) if (path / "manifest.json").is_file() else None


def ensure(log: Log | None = None) -> Build:
    """The build for the current inputs, building it first if needed (~15 min cold on 2 cores)."""
    build = cached()
    if build:
        return build
    log = log or _stderr
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with locked(CACHE_DIR / ".lock"):  # one build at a time; a waiter then finds it cached
        return cached() or _build(digest(), log)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _build(d: str, log: Log) -> Build:
    for stale in CACHE_DIR.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = CACHE_DIR / f".build-{d}-{os.getpid()}"
    (work / "bin").mkdir(parents=True)
    logfile = work / "build.log"
    started = time.monotonic()
    try:
        root = _ensure_root(log)
        log(f"memsnap: fetching {SOURCE_PACKAGE} {SOURCE_VERSION} (Debian 12 source), log: {logfile}")
        _run_in_root(root, ["bash", "-euo", "pipefail", "-c", _FETCH_SCRIPT], logfile,
                     f"apt-get source {SOURCE_PACKAGE}={SOURCE_VERSION}")
        log(f"memsnap: building {', '.join(COMMANDS)} {GIT_VERSION} (about 15 minutes cold), log: {logfile}")
        _run_in_root(root, ["bash", "-euo", "pipefail", "-c", _MAKE_SCRIPT], logfile, "make (kubernetes)",
                     env=_go_env())
        out = root / SRC.lstrip("/") / "_output/local/bin/linux/amd64"
        for name in COMMANDS:
            shutil.copy2(out / name, work / "bin" / name)
        _run_in_root(root, ["gcc", *_PAUSE_FLAGS, "-o", "/build/pause", f"{SRC}/build/pause/linux/pause.c"],
                     logfile, "gcc (pause)")
        shutil.copy2(root / "build/pause", work / "bin/pause")
        for path in ROOT_BINARIES:
            shutil.copy2(root / path.lstrip("/"), work / "bin" / Path(path).name)
        shutil.rmtree(root / "build/gopath", ignore_errors=True)  # source and objects: fetched again next time
        manifest = {"digest": d, "version": GIT_VERSION, "source": f"{SOURCE_PACKAGE} {SOURCE_VERSION}",
                    "commands": list(COMMANDS), "pause_image": PAUSE_IMAGE,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.monotonic() - started, 1)}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(work, CACHE_DIR / d)
    except BaseException:
        kept = CACHE_DIR / f"failed-{d}.log"
        if logfile.exists():
            shutil.copyfile(logfile, kept)
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"memsnap: kubernetes binaries {d} built in {manifest['build_seconds']} s")
    _prune(keep=d)
    return Build(d, CACHE_DIR / d)


def _prune(keep: str, spare: int = 1) -> None:
    """Drop builds of other inputs but the `spare` newest (~400 MB each; checkouts on other commits)."""
    others = [p for p in CACHE_DIR.iterdir() if p.is_dir() and (p / "manifest.json").is_file() and p.name != keep]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[spare:]:
        shutil.rmtree(old, ignore_errors=True)


# Unpacked and patched by apt-get source (dpkg-source -x); reflect2 1.0.1 crashes with Go >= 1.18
# on the first custom-resource POST, so Debian's 1.0.2 source takes its place in vendor/.
_FETCH_SCRIPT = f"""
sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/src.list
apt-get update -qq
mkdir -p /build/gopath/src/k8s.io && cd /build/gopath/src/k8s.io
rm -rf {SOURCE_PACKAGE}-* {SRC}
apt-get source -qq {SOURCE_PACKAGE}={SOURCE_VERSION}
mv $(find . -maxdepth 1 -type d -name '{SOURCE_PACKAGE}-*' | head -1) {SRC}
rm -f *.dsc *.tar.* 
v={SRC}/vendor/github.com/modern-go/reflect2
rm -rf $v && cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 $v
rm -f $v/go.mod $v/go.sum $v/*_test.go
"""

_PAUSE_FLAGS = ("-Os", "-Wall", "-static", f"-DVERSION={GIT_VERSION}")
_MAKE_SCRIPT = f"""
cd {SRC}
rm -rf _output
nice -n 10 make WHAT="{' '.join('cmd/' + c for c in COMMANDS)}"
"""


def _go_env() -> dict[str, str]:
    return {"GOPATH": "/build/gopath", "GOFLAGS": "-mod=vendor", "GOPROXY": "off", "GO111MODULE": "on",
            "GOCACHE": "/build/gocache", "CGO_ENABLED": "0", "KUBE_GIT_VERSION": GIT_VERSION,
            "KUBE_GIT_TREE_STATE": "clean", "KUBE_GIT_COMMIT": GIT_COMMIT, "GOMAXPROCS": "2"}


def _ensure_root(log: Log) -> Path:
    root = CACHE_DIR / f"root-{_root_key()}"
    if (root / ".memsnap-ready").exists():
        return root
    if not shutil.which("debootstrap"):
        raise BuildError("debootstrap is not installed (apt-get install debootstrap)")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    logfile = CACHE_DIR / f"root-{_root_key()}.log"
    log(f"memsnap: creating the Debian 12 build root {root} (debootstrap, a few minutes), log: {logfile}")
    with open(logfile, "w") as out:
        proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
                               SUITE, str(tmp)], stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise BuildError(f"debootstrap {SUITE} failed (exit {proc.returncode}), log: {logfile}")
    shutil.copyfile("/etc/resolv.conf", tmp / "etc/resolv.conf")
    (tmp / "build/gocache").mkdir(parents=True)
    (tmp / ".memsnap-ready").touch()
    os.rename(tmp, root)
    for old in CACHE_DIR.glob("root-*"):  # roots of other inputs: ~1 GB each
        if old.is_dir() and old != root and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return root


def _run_in_root(root: Path, argv: list[str], logfile: Path, what: str, env: dict[str, str] | None = None) -> None:
    """Run argv chrooted in root with /proc and /dev, in a private mount namespace."""
    script = (f"mount --make-rprivate / && mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev"
              ' && exec chroot "$0" "$@"')
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C",
                "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
    with open(logfile, "a") as out:
        out.write(f"\n=== {what}\n")
        out.flush()
        proc = subprocess.run(["unshare", "-m", "sh", "-c", script, str(root), "env", "-i",
                               *(f"{k}={v}" for k, v in full_env.items()), *argv],
                              stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise BuildError(f"{what} failed (exit {proc.returncode}), log: {logfile}")


def main() -> int:
    try:
        build = ensure()
    except BuildError as exc:
        print(f"memsnap cluster build: {exc}", file=sys.stderr)
        return 1
    print(build.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
