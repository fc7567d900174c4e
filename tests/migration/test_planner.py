"""The planner's decisions from measured rounds (pure logic: no nodes needed)."""
from memsnap.migration.planner import MIB, Planner, Policy, Round

PAGE = 4096


def rnd(i, dirty_pages, sent, collect_s=1.0, send_s=1.0):
    return Round(i, dirty_pages, sent, collect_s, send_s)


def test_first_round_always_continues_then_finalizes_when_the_rest_fits():
    p = Planner(Policy(max_downtime_ms=300), memory_bytes=1024 * MIB, fixed_cost_s=0.1)
    assert p.observe(rnd(0, 262144, 1024 * MIB, send_s=4.0), now=p.started + 5).action == "continue"
    # 100 pages/s dirtied, 0.05 s to send: ~20 KiB left at 256 MiB/s -> ~100 ms
    d = p.observe(rnd(1, 100, 100 * PAGE, collect_s=1.0, send_s=0.05), now=p.started + 6)
    assert d.action == "finalize", d
    assert p.rounds[-1].predicted_downtime_ms < 300


def test_a_workload_faster_than_the_link_fails_at_the_progress_timeout():
    p = Planner(Policy(max_downtime_ms=10, progress_timeout=5), memory_bytes=64 * MIB, fixed_cost_s=0.1)
    p.observe(rnd(0, 16384, 64 * MIB), now=p.started + 1)
    t, decisions = p.started + 1, []
    for i in range(1, 20):
        t += 1
        decisions.append(p.observe(rnd(i, 4000, 4000 * PAGE), now=t))
        if decisions[-1].action != "continue":
            break
    assert decisions[-1].action == "fail" and "progress" in decisions[-1].reason
    assert "--auto-converge" in decisions[-1].reason


def test_auto_converge_throttles_in_growing_steps():
    p = Planner(Policy(max_downtime_ms=10, progress_timeout=1000, auto_converge=True),
                memory_bytes=64 * MIB, fixed_cost_s=0.1)
    p.observe(rnd(0, 16384, 64 * MIB), now=p.started + 1)
    throttles = [p.observe(rnd(i, 4000, 4000 * PAGE), now=p.started + 1 + i).throttle_percent for i in range(1, 8)]
    assert throttles[0] == 0 and max(throttles) > 20
    assert throttles == sorted(throttles)


def test_completion_timeout_scales_with_memory():
    p = Planner(Policy(max_downtime_ms=1, completion_timeout_per_gib=10), memory_bytes=512 * MIB, fixed_cost_s=0.1)
    p.observe(rnd(0, 131072, 512 * MIB), now=p.started + 1)
    d = p.observe(rnd(1, 4000, 4000 * PAGE), now=p.started + 6)
    assert d.action == "fail" and "completion timeout" in d.reason


def test_bad_policies_are_refused():
    import pytest
    for bad in (Policy(max_downtime_ms=0), Policy(bandwidth_mib_s=-1), Policy(progress_timeout=0)):
        with pytest.raises(ValueError):
            bad.check()


def test_a_state_dump_floor_over_the_budget_finalizes_once_memory_is_small():
    p = Planner(Policy(max_downtime_ms=100), memory_bytes=64 * MIB, fixed_cost_s=0.3)
    p.observe(rnd(0, 16384, 64 * MIB), now=p.started + 1)
    d = p.observe(rnd(1, 10, 10 * PAGE, collect_s=1.0, send_s=0.01), now=p.started + 2)
    assert d.action == "finalize" and "300 ms" in d.reason, d


def test_a_floor_just_under_the_budget_finalizes_once_memory_is_small():
    # 290 ms of state leaves 10 ms for memory: a workload writing 10 MiB/s never gets there
    # (the 4 GiB migration of bench 7c failed at the progress timeout this way).
    p = Planner(Policy(max_downtime_ms=300), memory_bytes=64 * MIB, fixed_cost_s=0.29)
    p.observe(rnd(0, 16384, 64 * MIB), now=p.started + 1)
    d = p.observe(rnd(1, 2560, 10 * MIB, collect_s=1.0, send_s=0.13), now=p.started + 2)  # ~17 ms of memory
    assert d.action == "finalize" and "near the 300 ms budget" in d.reason, d


def test_the_time_a_layer_took_to_write_counts_in_the_prediction():
    # 10 MiB/s dirtied; the layer took 2 s to write after its dirty set was taken and 0.1 s
    # to send: ~21 MiB are written meanwhile, not 1 MiB (bench 7c at 4 GiB: predicted 212 ms
    # from the send alone, a 48 MiB final layer, paused 1.2 s).
    p = Planner(Policy(max_downtime_ms=300), memory_bytes=4096 * MIB, fixed_cost_s=0.1)
    p.observe(rnd(0, 1 << 20, 4096 * MIB, send_s=20.0), now=p.started + 30)
    r = Round(1, 2560, 10 * MIB, 1.0, 0.1, write_seconds=2.0)
    d = p.observe(r, now=p.started + 33)
    assert d.action == "continue", d
    assert abs(r.remaining_bytes - 21 * MIB) < 4096 and 305 < r.predicted_downtime_ms < 315, r


def test_a_pause_that_fits_waits_for_rounds_that_still_halve_what_is_left():
    """A 4 GiB workload's first rounds are long: the first round that fits leaves several times
    what the next would. Pre-copy goes on while a round halves what is left, then finalizes."""
    p = Planner(Policy(max_downtime_ms=300), memory_bytes=4096 * MIB, fixed_cost_s=0.1)
    p.observe(rnd(0, 1 << 20, 4096 * MIB, send_s=30.0), now=p.started + 30)
    rate = 10 * MIB // PAGE  # pages/s

    def link(seconds):  # bytes a 250 MiB/s link carries in that time
        return int(250 * MIB * seconds)
    # 1.4 s to write and send: 14 MiB left, 56 ms at 250 MiB/s: fits, but the round before left 4 GiB
    d = p.observe(rnd(1, 14 * rate, link(1.4), collect_s=14.0, send_s=1.4), now=p.started + 32)
    assert d.action == "continue", d
    # 0.4 s: 4 MiB left: fits, and less than half of 14 MiB
    d = p.observe(rnd(2, 14 * rate // 10, link(0.4), collect_s=1.4, send_s=0.4), now=p.started + 33)
    assert d.action == "continue", d
    # 0.35 s: 3.5 MiB left, no longer halving: finalize
    d = p.observe(rnd(3, 4 * rate // 10, link(0.35), collect_s=0.4, send_s=0.35), now=p.started + 34)
    assert d.action == "finalize", d
    assert [round(r.remaining_bytes / MIB, 1) for r in p.rounds[1:]] == [14.0, 4.0, 3.5]


def test_a_pause_that_fits_finalizes_at_the_completion_timeout_even_while_shrinking():
    p = Planner(Policy(max_downtime_ms=300, completion_timeout_per_gib=1), memory_bytes=1024 * MIB, fixed_cost_s=0.1)
    p.observe(rnd(0, 262144, 1024 * MIB), now=p.started + 0.5)
    d = p.observe(rnd(1, 2560, 100 * MIB, collect_s=1.0, send_s=1.0), now=p.started + 2)
    assert d.action == "finalize", d
