"""The cache planner's launch-time estimate (CostModel, _launch_us): programs resident per SM at once, the rest
queued largest first, all running ones sharing the GPU. Worked examples on a 132-SM GPU."""

import numpy as np
import pytest
from packinfer import cache_plan
from packinfer.cache_plan import _launch_us, resident_programs

SMS, LONE = 132, 1.2


def test_one_full_wave_of_equal_programs_takes_their_work_over_the_sms():
    """264 programs of 10 us (at a fair share of an SM), two per SM: every SM does 20 us of work."""
    assert _launch_us(np.full(33, 10.0), copies=8, places=2 * SMS, num_sms=SMS, lone=LONE) == pytest.approx(20.0)


def test_a_lone_program_runs_at_most_lone_speedup_times_its_fair_share():
    assert _launch_us(np.array([12.0]), copies=1, places=2 * SMS, num_sms=SMS, lone=LONE) == pytest.approx(10.0)


def test_a_split_that_queues_programs_behind_a_full_wave_is_estimated_slower():
    """The same keys cut into 288 programs (24 past the 264 places) or 144 of twice the work (one wave): the 24
    queued ones run their whole length with most SMs idle (an H100 Mooncake decode: 136.4 vs 114.0 us)."""
    fine = _launch_us(np.full(36, 5.0), copies=8, places=2 * SMS, num_sms=SMS, lone=LONE)
    coarse = _launch_us(np.full(18, 10.0), copies=8, places=2 * SMS, num_sms=SMS, lone=LONE)
    assert fine > 1.1 * coarse


def test_a_straggler_sets_the_launch_time():
    """One long program among short ones: its slot stays busy after the others finish (largest first)."""
    work = np.array([100.0] + [1.0] * 200)
    assert _launch_us(work, copies=1, places=2 * SMS, num_sms=SMS, lone=LONE) >= 100.0 / LONE


@pytest.mark.parametrize("seed", range(20))
def test_spreading_the_middle_waves_evenly_stays_near_placing_every_program(monkeypatch, seed):
    """Past EXACT_WAVES waves the middle ones are spread evenly over the slots (host time); on random descending
    work of up to 60 waves that is within 3% of placing every program one by one."""
    rng = np.random.default_rng(seed)
    work = np.sort(rng.gamma(2.0, 5.0, int(rng.integers(40, 2000))))[::-1] + 1.0
    copies, places = int(rng.choice([1, 8, 32])), int(rng.choice([SMS, 2 * SMS]))
    approx = _launch_us(work, copies, places, SMS, LONE)
    monkeypatch.setattr(cache_plan, "EXACT_WAVES", 10**9)
    exact = _launch_us(work, copies, places, SMS, LONE)
    assert approx == pytest.approx(exact, rel=0.03)


def test_resident_programs_follow_shared_memory():
    """Head dim 128, bf16, 64 keys per step and 3 stages on Hopper (228 KiB per SM): 16 and 32 query slots fit two
    programs per SM, 64 and 128 one."""
    assert [resident_programs(s, 64, 128, 2, 232448, 233472) for s in (16, 32, 64, 128)] == [2, 2, 1, 1]
