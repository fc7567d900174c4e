"""Host-side checks of the kernel ABI modules that need no memsnap kernel."""

from __future__ import annotations

from memsnap.kernel import tracefs, write_events


def test_parse_page_written() -> None:
    e = tracefs.parse_line(
        "  python3-123     [001] d..1.    12.345678: page_written: "
        "pid=123 seq=5 addr=0x7f0000001000 size=2097152\n")
    assert e == tracefs.Event("page_written", 123, 5, 0x7f0000001000,
                              0x7f0000001000 + 2097152, 1, 12.345678)


def test_parse_range_events_and_odd_comm() -> None:
    e = tracefs.parse_line("<...>-9 [000] .....  1.5: vma_removed: pid=7 seq=2 "
                           "start=0x1000 end=0x3000")
    assert (e.name, e.pid, e.seq, e.start, e.end) == ("vma_removed", 7, 2, 0x1000, 0x3000)
    weird = tracefs.parse_line("my prog [x]-4 [001] .... 2.0: vma_marked: pid=4 seq=1 "
                               "start=0x2000 end=0x4000")
    assert weird is not None and weird.pid == 4


def test_other_lines_are_ignored() -> None:
    assert tracefs.parse_line("CPU:1 [LOST 42 EVENTS]") is None
    assert tracefs.parse_line("bash-1 [000] .... 1.0: sched_switch: prev_comm=x") is None


def test_seq_check_finds_gaps() -> None:
    def ev(seq: int, pid: int = 1) -> tracefs.Event:
        return tracefs.Event("page_written", pid, seq, 0, 4096, 0, 0.0)

    check = tracefs.SeqCheck()
    check.add([ev(1), ev(2), ev(5), ev(4), ev(1, pid=2)])
    assert check.missing(1) == [3]
    assert check.missing(1, since=3) == []
    assert check.missing(2) == []
    assert check.missing(99) == []


def test_advice_numbers_are_the_abi() -> None:
    assert (write_events.MADV_MEMSNAP, write_events.MADV_NOMEMSNAP) == (120, 121)
