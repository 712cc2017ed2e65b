"""Fleet simulation: colocated instances behind the router policy, and disaggregated prefill/decode splits."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tokenmill.errors import ConfigError
from tokenmill.perf.cost_model import CostModel, ModelSpec
from tokenmill.perf.fleet import FleetSpec, best_split, max_goodput_rate, simulate_fleet
from tokenmill.perf.simulator import SimConfig, SimRequest, requests_from_workload, simulate

SPEC = ModelSpec(30, 576, 9, 3, 64, 1536, 49152)
CPU = CostModel(SPEC, bandwidth=20e9, matmul_rate=1.3e12, o_step=0.004, o_req=0.0003, o_tok=0.0001)


def test_one_colocated_instance_is_the_single_simulator():
    reqs = requests_from_workload("chat", 60, rate=3.0, seed=2)
    one = simulate(reqs, CPU, SimConfig(num_blocks=2000), 2000, 150, 3.0)
    fleet = simulate_fleet(reqs, CPU, SimConfig(num_blocks=2000), FleetSpec(1), 2000, 150, 3.0)
    assert fleet.completed == one.completed == 60
    assert fleet.ttft_s == pytest.approx(one.ttft_s)
    assert fleet.e2e_s == pytest.approx(one.e2e_s)
    assert fleet.good == one.good


def test_two_instances_halve_the_load():
    reqs = requests_from_workload("chat", 80, rate=8.0, seed=0)
    one = simulate_fleet(reqs, CPU, SimConfig(num_blocks=2000), FleetSpec(1))
    for pol in ("round-robin", "least-load", "prefix"):
        two = simulate_fleet(reqs, CPU, SimConfig(num_blocks=2000), FleetSpec(2, router_policy=pol))
        assert two.completed == 80 and two.output_tokens == one.output_tokens
        assert two.summary()["e2e_ms"]["p50"] < one.summary()["e2e_ms"]["p50"], pol


def test_disaggregated_latencies_add_the_transfer():
    r = simulate_fleet([SimRequest(320, 5, 0.0)], CPU, SimConfig(), FleetSpec(2, 1, transfer_s_per_block=0.01))
    prefill = CPU.predict(320, 1, 320, 320 * 321 // 2)
    assert r.ttft_s[0] == pytest.approx(prefill)  # the prefill instance sends the first token
    decodes = sum(CPU.predict(1, 1, 321 + k, 321 + k) for k in range(4))
    assert r.e2e_s[0] == pytest.approx(prefill + 20 * 0.01 + decodes)  # 320 tokens = 20 blocks


def _decode_ends(start: float, ctx: int, n: int) -> list[float]:
    """End times of n decode steps of one request alone on a decode instance from `start` (context ctx first)."""
    ends, t = [], start
    for k in range(n):
        t += CPU.predict(1, 1, ctx + k, ctx + k)
        ends.append(t)
    return ends


def test_disaggregated_first_token_waits_for_the_decode_step_in_progress():
    """The decode instance takes a request (and reports its first token) between steps, hop_s after the prefill."""
    hop = 0.005
    p16 = CPU.predict(16, 1, 16, 16 * 17 // 2)
    ends = _decode_ends(p16 + hop, 17, 40)  # r0 decodes alone from the moment it is taken
    a1 = ends[5] + 0.3 * (ends[6] - ends[5]) - p16 - hop  # r1 reaches the decode side mid-way through step 7
    assert a1 > p16  # the prefill instance is idle again
    r = simulate_fleet([SimRequest(16, 41, 0.0), SimRequest(16, 1, a1)], CPU, SimConfig(), FleetSpec(2, 1, hop_s=hop))
    assert r.ttft_s[0] == pytest.approx(p16 + hop)
    assert r.ttft_s[1] == pytest.approx(ends[6] - a1)  # not p16 + hop: the step in progress ends first
    assert r.e2e_s[0] == pytest.approx(ends[-1])  # one output token: r1 never joins r0's batch


def test_ingress_delays_the_scheduler_not_the_clock_ttft_counts_from():
    """ingress_s (HTTP, chat template, tokenizing): a request reaches the scheduler that long after its send and TTFT
    counts from the send; every request's is the same, so the queue keeps its order and batches."""
    p320 = CPU.predict(320, 1, 320, 320 * 321 // 2)
    for spec in (FleetSpec(1, ingress_s=0.008), FleetSpec(2, 1, hop_s=0.005, ingress_s=0.008)):
        base = dataclasses.replace(spec, ingress_s=0.0)
        one = [SimRequest(320, 1 if spec.prefill_instances else 4, 0.0)]
        assert simulate_fleet(one, CPU, SimConfig(), spec).ttft_s[0] == pytest.approx(
            simulate_fleet(one, CPU, SimConfig(), base).ttft_s[0] + 0.008)
    two = [SimRequest(320, 1, 0.0), SimRequest(320, 1, p320 - 0.004)]  # r1 sent 4 ms before r0's step ends
    no_ing = simulate_fleet(two, CPU, SimConfig(), FleetSpec(1)).ttft_s
    ing = simulate_fleet(two, CPU, SimConfig(), FleetSpec(1, ingress_s=0.008)).ttft_s
    assert no_ing[1] == pytest.approx(0.004 + p320)  # waits for r0's step, then runs its own
    assert ing == pytest.approx([t + 0.008 for t in no_ing])
    with pytest.raises(ConfigError, match="ingress time"):
        FleetSpec(2, 1, ingress_s=-1.0).validate()


def test_disaggregated_pull_overlaps_the_other_requests_steps():
    """A request's pull (per pull + per block) runs while the instance decodes the others; it joins the first step
    that starts after the pull ends."""
    p16 = CPU.predict(16, 1, 16, 16 * 17 // 2)
    spec = FleetSpec(2, 1, transfer_s_per_block=0.004, transfer_s_per_pull=0.003)
    ends = _decode_ends(p16 + spec.transfer_s(1), 17, 60)  # r0: 16 tokens = 1 block
    a1 = ends[2] + 1e-4 - p16  # r1 (160 tokens: 10 blocks) reaches the decode side just after step 3
    r = simulate_fleet([SimRequest(16, 61, 0.0), SimRequest(160, 2, a1)], CPU, SimConfig(), spec)
    taken = ends[3]  # the end of step 4, in progress when it arrived
    assert r.ttft_s[1] == pytest.approx(taken - a1)
    ready = taken + spec.transfer_s(10)
    join = next(e for e in ends if e >= ready)  # r0's steps go on during the pull
    k = ends.index(join) + 1  # r0's steps done when r1 joins
    assert r.e2e_s[1] == pytest.approx(join + CPU.predict(2, 2, 17 + k + 161, 17 + k + 161) - a1)


def test_scaled_cost_model_and_a_slower_decode_side():
    regimes = dataclasses.replace(CPU, small_regimes=((64, 0.002, 0.0002, 5e11),))
    for m in (CPU, regimes):
        for shape in ((1, 1, 300, 300), (512, 1, 512, 512 * 513 // 2), (8, 8, 4000, 4000)):
            assert m.scaled(1.5).predict(*shape) == pytest.approx(1.5 * m.predict(*shape))
    slow = CPU.scaled(1.5)
    with pytest.raises(ConfigError):
        CPU.scaled(0)
    reqs = [SimRequest(320, 5, 0.0)]
    base = simulate_fleet(reqs, CPU, SimConfig(), FleetSpec(2, 1))
    r = simulate_fleet(reqs, CPU, SimConfig(), FleetSpec(2, 1), decode_cost=slow)
    assert r.ttft_s == pytest.approx(base.ttft_s)  # the prefill side runs at `cost`
    assert r.e2e_s[0] - r.ttft_s[0] == pytest.approx(1.5 * (base.e2e_s[0] - base.ttft_s[0]))


@pytest.mark.slow
def test_disaggregation_wins_on_long_prefill_with_a_tight_tpot():
    """DistServe's effect: long prompts interfere with decodes on colocated instances; at a tight TPOT the
    split serves more per instance."""
    def make(rate):
        return requests_from_workload("long-prefill", 80, rate, seed=0)

    cfg = SimConfig(num_blocks=20000, max_num_batched_tokens=4096)
    res = best_split(make, CPU, cfg, 4, "least-load", 0.0, slo_ttft_ms=4000, slo_tpot_ms=60)
    by = {s.label: g for s, g in res}
    assert set(by) == {"colocated x4", "1P + 3D", "2P + 2D", "3P + 1D"}
    assert max(by["1P + 3D"], by["2P + 2D"], by["3P + 1D"]) > by["colocated x4"]
    assert res[0][1] == max(by.values())


@pytest.mark.slow
def test_goodput_rate_monotone_in_instances():
    def make(rate):
        return requests_from_workload("chat", 50, rate, seed=0)

    one = max_goodput_rate(make, CPU, SimConfig(num_blocks=4000), FleetSpec(1), 3000, 200)
    two = max_goodput_rate(make, CPU, SimConfig(num_blocks=4000), FleetSpec(2), 3000, 200)
    assert two > 1.5 * one > 0


def test_bad_specs():
    for spec in (FleetSpec(0), FleetSpec(2, 2), FleetSpec(2, router_policy="random"),
                 FleetSpec(2, 1, transfer_s_per_block=-1), FleetSpec(2, 1, transfer_s_per_pull=-1),
                 FleetSpec(2, 1, hop_s=-0.1)):
        with pytest.raises(ConfigError):
            spec.validate()


def test_no_torch():
    code = "import sys; sys.modules['torch'] = None; import tokenmill.perf.fleet"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_per_type_rates_compose_splits():
    from tokenmill.perf.fleet import PerTypeRates

    r = PerTypeRates(colocated=2.0, prefill=6.0, decode=3.0)
    assert r.per_instance(4, 0) == 2.0
    assert r.per_instance(4, 1) == min(6.0, 9.0) / 4
    assert r.per_instance(4, 2) == min(12.0, 6.0) / 4


def test_return_leg_comes_after_the_decode_boundary():
    """return_s (the decode side's first token -> the client) adds to TTFT and e2e, not TPOT; hop_s alone is the
    way to the decode instance's engine, so a request that just makes a boundary keeps making it."""
    p16 = CPU.predict(16, 1, 16, 16 * 17 // 2)
    base = FleetSpec(2, 1, hop_s=0.005)
    ret = dataclasses.replace(base, return_s=0.009)
    one = [SimRequest(16, 5, 0.0)]
    a, b = simulate_fleet(one, CPU, SimConfig(), base), simulate_fleet(one, CPU, SimConfig(), ret)
    assert b.ttft_s[0] == pytest.approx(a.ttft_s[0] + 0.009) == pytest.approx(p16 + 0.014)
    assert b.e2e_s[0] == pytest.approx(a.e2e_s[0] + 0.009)
    assert b.tpot_s == pytest.approx(a.tpot_s)
    # r1 reaches the decode side 2 ms before r0's step 7 ends: taken at that boundary with or without return_s
    ends = _decode_ends(p16 + 0.005, 17, 40)
    a1 = ends[6] - 0.002 - p16 - 0.005
    two = [SimRequest(16, 41, 0.0), SimRequest(16, 1, a1)]
    assert simulate_fleet(two, CPU, SimConfig(), ret).ttft_s[1] == pytest.approx(ends[6] + 0.009 - a1)
    with pytest.raises(ConfigError, match="return time"):
        FleetSpec(2, 1, return_s=-0.001).validate()


def test_a_prefill_steps_requests_reach_the_decode_side_together_later_per_request():
    """hop_s_per_request: the k requests one prefill step finished arrive hop_s + (k - 1) x per request after it."""
    three = [SimRequest(100, 1, 0.0) for _ in range(3)]  # one prefill step of 3 prompts
    spec = FleetSpec(2, 1, hop_s=0.006, hop_s_per_request=0.004)
    r = simulate_fleet(three, CPU, SimConfig(), spec)
    p = CPU.predict(300, 3, 300, 3 * 100 * 101 // 2)
    assert r.ttft_s == pytest.approx([p + 0.006 + 2 * 0.004] * 3)
    alone = simulate_fleet(three[:1], CPU, SimConfig(), spec)
    assert alone.ttft_s[0] == pytest.approx(CPU.predict(100, 1, 100, 100 * 101 // 2) + 0.006)
    with pytest.raises(ConfigError, match="per request"):
        FleetSpec(2, 1, hop_s_per_request=-1.0).validate()


def _load_reqs(n: int = 40, rate: float = 2.0) -> list[SimRequest]:
    return requests_from_workload("chat", n, rate, seed=3)


def test_no_spread_or_zero_spread_is_the_deterministic_simulation():
    from tokenmill.perf.fleet import StepSpread

    reqs, spec = _load_reqs(), FleetSpec(2, 1, hop_s=0.005, transfer_s_per_block=0.0004)
    base = simulate_fleet(reqs, CPU, SimConfig(), spec)
    for sp in (StepSpread(), StepSpread(residuals=((100, 1.0), (300, 1.0), (900, 1.0)))):
        r = simulate_fleet(reqs, CPU, SimConfig(), spec, spread=sp, seed=7)
        assert r.ttft_s == pytest.approx(base.ttft_s) and r.e2e_s == pytest.approx(base.e2e_s)


def test_spread_draws_are_seeded_and_mean_preserving():
    """The same seed gives the same run; a residual pool's mean is taken out, so a pool of [0.5, 1.5] scatters
    steps by +-50% around the model and the total busy time stays about the model's."""
    from tokenmill.perf.fleet import StepSpread, _Jitter
    import random

    sp = StepSpread(residuals=tuple((n, r) for n in (100, 200, 400, 800) for r in (1.0, 3.0)))  # mean 2 -> 0.5 / 1.5
    j = _Jitter(sp, random.Random(1))
    draws = [j(300) for _ in range(4000)]
    assert set(round(x, 9) for x in draws) == {0.5, 1.5}
    assert sum(draws) / len(draws) == pytest.approx(1.0, abs=0.03)
    logn = _Jitter(StepSpread(step_sigma=0.2), random.Random(2))
    assert sum(logn() for _ in range(20000)) / 20000 == pytest.approx(1.0, abs=0.01)
    reqs, spec = _load_reqs(), FleetSpec(2, 1, hop_s=0.005)
    a = simulate_fleet(reqs, CPU, SimConfig(), spec, spread=sp, seed=4)
    b = simulate_fleet(reqs, CPU, SimConfig(), spec, spread=sp, seed=4)
    c = simulate_fleet(reqs, CPU, SimConfig(), spec, spread=sp, seed=5)
    assert a.ttft_s == b.ttft_s and a.ttft_s != c.ttft_s
    with pytest.raises(ConfigError, match="speed sigma"):
        simulate_fleet(reqs, CPU, SimConfig(), spec, spread=StepSpread(speed_sigma=-0.1))
    with pytest.raises(ConfigError, match="residuals"):
        StepSpread(residuals=((100, 0.0),)).validate()


def test_residuals_are_drawn_from_steps_of_similar_size():
    """A step draws from the traced steps nearest its token count: short steps' large scatter does not reach long
    steps."""
    from tokenmill.perf.fleet import RESIDUAL_NEIGHBOURS, StepSpread, _Jitter
    import random

    short = [(60 + k, r) for k in range(RESIDUAL_NEIGHBOURS) for r in (0.5, 1.5)]
    long = [(1000 + k, 1.0) for k in range(RESIDUAL_NEIGHBOURS)]
    j = _Jitter(StepSpread(residuals=tuple(short + long)), random.Random(0))
    assert {j(1200) for _ in range(200)} == {1.0}
    assert {round(j(64), 9) for _ in range(200)} == {0.5, 1.5}


def test_queueing_turns_step_scatter_into_a_wider_ttft_median_band():
    """fleet_replicates / replicate_figures: the median of simulated runs' TTFT p50 and its 10-90% band; a
    wider step scatter widens the band, and the band holds the deterministic run's figure here."""
    from tokenmill.perf.fleet import StepSpread, fleet_replicates, replicate_figures

    reqs = _load_reqs(60, 3.0)
    spec = FleetSpec(2, 1, hop_s=0.005, transfer_s_per_block=0.0004)
    det = simulate_fleet(reqs, CPU, SimConfig(), spec).summary()["ttft_ms"]["p50"]
    bands = []
    for sigma in (0.05, 0.3):
        runs = fleet_replicates(reqs, CPU, SimConfig(), spec, StepSpread(step_sigma=sigma), replicates=16, seed=1)
        assert len(runs) == 16 and all(r.completed == 60 for r in runs)
        f = replicate_figures(runs)
        assert set(f) == {"ttft_p50_ms", "tpot_p50_ms", "output_tok_s"}
        for v in f.values():
            assert v["p10"] <= v["median"] <= v["p90"]
        bands.append(f["ttft_p50_ms"]["p90"] - f["ttft_p50_ms"]["p10"])
        assert f["ttft_p50_ms"]["p10"] * 0.9 <= det <= f["ttft_p50_ms"]["p90"] * 1.1
    assert bands[1] > bands[0]
    with pytest.raises(ConfigError):
        fleet_replicates(reqs, CPU, SimConfig(), spec, StepSpread(), replicates=0)


def test_parts_split_each_ttft_into_queue_step_and_after():
    """parts: queue (send to the step's start, less ingress) + the step + after = TTFT - ingress, per request."""
    spec = FleetSpec(2, 1, hop_s=0.006, ingress_s=0.007, hop_s_per_request=0.002, return_s=0.004)
    p320 = CPU.predict(320, 1, 320, 320 * 321 // 2)
    reqs = [SimRequest(320, 4, 0.0), SimRequest(320, 4, 0.01)]  # r1 queues behind r0's prefill
    parts: dict = {}
    r = simulate_fleet(reqs, CPU, SimConfig(), spec, parts=parts)
    assert set(parts) == {0, 1}
    for i, p in parts.items():
        assert p["queue_s"] + p["step_s"] + p["after_s"] + 0.007 == pytest.approx(r.ttft_s[i])
    assert parts[0]["queue_s"] == pytest.approx(0.0) and parts[0]["step_s"] == pytest.approx(p320)
    assert parts[1]["queue_s"] == pytest.approx(p320 - 0.01)
    assert parts[0]["after_s"] == pytest.approx(0.006 + 0.004)  # an idle decode side takes it at once


def test_step_gaps_lengthen_the_step_period_not_the_step():
    """step_gap_s / decode_step_gap_s: the engine loop's time between steps; a token is out at its step's end,
    the next step starts a gap later."""
    p320 = CPU.predict(320, 1, 320, 320 * 321 // 2)
    base = FleetSpec(2, 1)
    gap = dataclasses.replace(base, step_gap_s=0.003, decode_step_gap_s=0.001)
    two = [SimRequest(320, 11, 0.0), SimRequest(320, 11, 0.0005)]  # r1 waits for r0's step, and its gap
    a, b = simulate_fleet(two, CPU, SimConfig(), base), simulate_fleet(two, CPU, SimConfig(), gap)
    assert b.ttft_s[0] == pytest.approx(a.ttft_s[0]) == pytest.approx(p320)
    assert b.ttft_s[1] == pytest.approx(a.ttft_s[1] + 0.003)
    one = [SimRequest(320, 11, 0.0)]
    assert simulate_fleet(one, CPU, SimConfig(), gap).tpot_s[0] == pytest.approx(  # 10 decode steps, 9 gaps inside
        simulate_fleet(one, CPU, SimConfig(), base).tpot_s[0] + 0.001 * 9 / 10)
    with pytest.raises(ConfigError, match="step gap"):
        FleetSpec(2, 1, decode_step_gap_s=-1.0).validate()
