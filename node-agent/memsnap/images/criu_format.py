"""The two CRIU image files memsnap writes itself: pagemap-<pid>.img and pages-<id>.img.

pagemap is a protobuf image: two magics, then each message as a little-endian u32 length and
its bytes; a head naming the pages file, then entries (vaddr, nr_pages, flags). memsnap reads
and writes it itself (a pagemap holds one entry per run of pages, tens of thousands in a
migration's final layer, and pycriu's generic dict conversion cost ~4 µs each, during the
pause). pages-<id>.img holds the data of the PE_PRESENT entries back to back; PE_PARENT
pages are in the parent directory's images. Other images go through pycriu.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..kernel.pagemap import PAGE_SIZE

PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

PAGEMAP_RE = re.compile(r"^pagemap-(\d+)\.img$")

# criu/include/magic.h; images/pagemap.proto: head {pages_id = 1}, entry {vaddr = 1,
# nr_pages = 2, in_parent = 3 (images of old CRIUs), flags = 4}, all varints.
IMG_COMMON_MAGIC, PAGEMAP_MAGIC = 0x54564319, 0x56084025
_MAGICS = struct.Struct("<II")
_U32 = struct.Struct("<I")
_VADDR, _NR_PAGES, _IN_PARENT, _FLAGS, _PAGES_ID = 0x08, 0x10, 0x18, 0x20, 0x08  # field keys


def _pycriu():
    try:
        import pycriu.images
    except ImportError:
        raise RuntimeError("pycriu (CRIU's image library, Debian package python3-pycriu) is "
                           "needed to read and write CRIU images") from None
    return pycriu.images


@dataclass
class Pagemap:
    pages_id: int
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (vaddr, nr_pages, flags)

    def pages(self, flag: int) -> list[tuple[int, int]]:
        """[start, end) address ranges of the entries with `flag`."""
        return [(v, v + n * PAGE_SIZE) for v, n, f in self.entries if f & flag]


def pagemap_path(directory: Path, pid: int) -> Path:
    return directory / f"pagemap-{pid}.img"


def pages_path(directory: Path, pages_id: int) -> Path:
    return directory / f"pages-{pages_id}.img"


def pagemap_pids(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for name in os.listdir(directory) if (m := PAGEMAP_RE.match(name)))


def read_pagemap(path: Path) -> Pagemap:
    data = path.read_bytes()
    if len(data) < _MAGICS.size or _MAGICS.unpack_from(data) != (IMG_COMMON_MAGIC, PAGEMAP_MAGIC):
        raise ValueError(f"{path} is not a pagemap image")
    try:
        messages = list(_messages(data, _MAGICS.size))
    except (IndexError, struct.error):
        raise ValueError(f"{path}: truncated pagemap image") from None
    if not messages:
        raise ValueError(f"{path}: pagemap image without a head")
    head, *entries = messages
    return Pagemap(head.get(_PAGES_ID, 0), [_entry(path, e) for e in entries])


def _messages(data: bytes, pos: int):
    """Each message's fields as {key: value}; every field of a pagemap is a varint."""
    end = len(data)
    while pos < end:
        (size,) = _U32.unpack_from(data, pos)
        pos += 4
        stop = pos + size
        if stop > end:
            raise IndexError(pos)
        fields = {}
        while pos < stop:
            key = data[pos]
            value = shift = 0
            while True:
                pos += 1
                b = data[pos]
                value |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            pos += 1
            if key & 7:  # a wire type other than varint: not a pagemap
                raise ValueError(f"unexpected field key {key:#x}")
            fields[key] = value
        yield fields


def _entry(path: Path, e: dict[int, int]) -> tuple[int, int, int]:
    if _VADDR not in e or _NR_PAGES not in e:
        raise ValueError(f"{path}: a pagemap entry without vaddr or nr_pages")
    flags = e.get(_FLAGS)
    if e.get(_IN_PARENT):  # as CRIU's init_compat_pagemap_entry()
        flags = (flags or 0) | PE_PARENT
    elif flags is None:
        flags = PE_PRESENT
    return e[_VADDR], e[_NR_PAGES], flags


def write_pagemap(path: Path, pagemap: Pagemap) -> None:
    out = bytearray(_MAGICS.pack(IMG_COMMON_MAGIC, PAGEMAP_MAGIC))
    _append_message(out, bytes([_PAGES_ID]) + _varint(pagemap.pages_id))
    for v, n, f in pagemap.entries:
        _append_message(out, b"\x08" + _varint(v) + b"\x10" + _varint(n) + b"\x20" + _varint(f))
    with open(path, "wb") as f:
        f.write(out)


def _append_message(out: bytearray, message: bytes) -> None:
    out += _U32.pack(len(message))
    out += message


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


IMAGES_VERSION = 2  # CRIU_IMAGES_V1_1, what CRIU 3.x and 4.x write


def write_inventory(directory: Path) -> None:
    """inventory.img with the time of this layer (microseconds since boot, as CRIU counts).

    CRIU reads its parent's dump_uptime to tell a process that lived through the parent dump
    from a new one with the same pid; without it, it ignores the parent and dumps everything.
    """
    with open("/proc/uptime") as f:
        uptime_us = int(float(f.read().split()[0]) * 1_000_000)
    with open(directory / "inventory.img", "wb") as f:
        _pycriu().dump({"magic": "INVENTORY", "entries": [
            {"img_version": IMAGES_VERSION, "fdinfo_per_id": True, "dump_uptime": uptime_us}]}, f)
