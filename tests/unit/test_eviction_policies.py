"""Eviction policies: each policy's own behaviour as tables, then one contract for all of them,
driven by seeded random sequences of hit/insert/remove with the invariants checked after every
operation against a model of what must be present."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from edge.policy import (
    POLICY_NAMES,
    CountMinSketch,
    EvictionPolicy,
    HistorySketch,
    LRUPolicy,
    S3FIFOPolicy,
    SIEVEPolicy,
    SizeAwareTinyLFUPolicy,
    SizeBookedPolicy,
    TinyLFUPolicy,
    make_policy,
)

# ---- helpers ---------------------------------------------------------------------------------

# A step: ("insert", key, size_bytes), ("hit", key, 0) or ("remove", key, 0).
Step = tuple[str, str, int]


def play(policy: SizeBookedPolicy, steps: list[Step]) -> list[list[str]]:
    """Run steps, checking the invariants after each; return what each step evicted."""
    results: list[list[str]] = []
    for action, key, size_bytes in steps:
        if action == "insert":
            results.append(policy.insert(key, size_bytes))
        elif action == "hit":
            policy.hit(key)
            results.append([])
        else:
            policy.remove(key)
            results.append([])
        policy.check_invariants()
    return results


def fill(keys: str, size_bytes: int = 1) -> list[Step]:
    return [("insert", key, size_bytes) for key in keys]


def ins(key: str, size_bytes: int = 1) -> Step:
    return ("insert", key, size_bytes)


def hits(keys: str) -> list[Step]:
    """One hit per one-letter key."""
    return [("hit", key, 0) for key in keys]


def touch(key: str) -> Step:
    return ("hit", key, 0)


def rm(key: str) -> Step:
    return ("remove", key, 0)


def evictions(policy: SizeBookedPolicy, steps: list[Step]) -> list[list[str]]:
    """Only the non-empty eviction lists, in order."""
    return [result for result in play(policy, steps) if result]


def present(policy: EvictionPolicy) -> set[str]:
    return set(policy.keys())


# ---- LRU -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "steps", "last_evicted", "after"),
    [
        pytest.param(3, [*fill("abc"), ins("d")], ["a"], "bcd", id="evicts-oldest"),
        pytest.param(3, [*fill("abc"), *hits("a"), ins("d")], ["b"], "acd", id="hit-refreshes"),
        pytest.param(
            10,
            [ins("a", 4), ins("b", 4), *hits("a"), ins("c", 6)],
            ["b"],
            "ac",
            id="size-aware-one-is-enough",
        ),
        pytest.param(
            10,
            [ins("a", 4), ins("b", 4), *hits("a"), ins("c", 9)],
            ["b", "a"],
            "c",
            id="evicts-until-it-fits",
        ),
        pytest.param(
            10,
            [ins("a", 4), ins("b", 4), ins("a", 4), ins("c", 2)],
            [],
            "abc",
            id="exact-fit-evicts-nothing",
        ),
        pytest.param(
            10,
            [ins("a", 4), ins("b", 4), ins("a", 4), ins("c", 3)],
            ["b"],
            "ac",
            id="reinsert-refreshes",
        ),
    ],
)
def test_lru_evicts_least_recently_used(
    capacity: int, steps: list[Step], last_evicted: list[str], after: str
) -> None:
    policy = LRUPolicy(capacity)
    assert play(policy, steps)[-1] == last_evicted
    assert present(policy) == set(after)


# ---- S3-FIFO ---------------------------------------------------------------------------------


def test_s3fifo_scan_of_one_hit_wonders_keeps_the_working_set() -> None:
    working_set = [f"hot{i}" for i in range(20)]
    scan = [f"scan{i}" for i in range(1_000)]

    def run(policy: SizeBookedPolicy) -> set[str]:
        for key in working_set:
            policy.insert(key, 1)
        for _ in range(3):
            for key in working_set:
                policy.hit(key)
        for key in scan:
            policy.insert(key, 1)
        policy.check_invariants()
        return present(policy) & set(working_set)

    assert run(S3FIFOPolicy(100)) == set(working_set)
    assert run(LRUPolicy(100)) == set()  # what the scan does to the baseline


def test_s3fifo_new_keys_enter_small_and_unhit_ones_leave_for_the_ghost() -> None:
    policy = S3FIFOPolicy(100)  # small: 10 bytes
    play(policy, fill("a"))
    assert policy.in_small("a")
    play(policy, [ins(f"k{i}") for i in range(100)])
    assert "a" not in policy
    assert policy.in_ghost("a")


def test_s3fifo_ghost_hit_goes_straight_to_main() -> None:
    policy = S3FIFOPolicy(100)
    play(policy, [*fill("a"), *[ins(f"k{i}") for i in range(100)]])
    assert policy.in_ghost("a")
    assert "a" not in play(policy, fill("a"))[-1]
    assert policy.in_main("a")
    assert not policy.in_ghost("a")


def test_s3fifo_hit_in_small_moves_to_main_instead_of_leaving() -> None:
    policy = S3FIFOPolicy(100)
    play(policy, [*fill("a"), *hits("a"), *[ins(f"k{i}") for i in range(100)]])
    assert policy.in_main("a")
    assert not policy.in_ghost("a")


def test_s3fifo_main_reinserts_hit_objects_and_evicts_unhit_ones() -> None:
    policy = S3FIFOPolicy(10)  # small: 1 byte, main: the rest
    for index in range(9):  # nine keys hit once in small...
        play(policy, [ins(f"m{index}"), touch(f"m{index}")])
    # ...move to main (keeping freq 1) when small must give up a key; x0 was never hit
    assert evictions(policy, [ins("x0"), ins("x1")]) == [["x0"]]
    assert all(policy.in_main(f"m{index}") for index in range(9))
    play(policy, [touch("m0")])  # m0: freq 2
    # y0 replaces x1 in small; each later newcomer, hit once, pushes its predecessor into main
    # and main must give up a key: one sweep takes every freq to 0 and m0 to 1, the second
    # sweep evicts the oldest key that reached 0 — m1, then m2, ... — while m0 lasts.
    steps = [step for i in range(8) for step in (ins(f"y{i}"), touch(f"y{i}"))]
    assert evictions(policy, steps) == [["x1"], *[[f"m{i}"] for i in range(1, 8)]]
    assert {"m0", "m8"} <= present(policy)


def test_s3fifo_frequency_is_capped_at_three() -> None:
    policy = S3FIFOPolicy(100)
    play(policy, [*fill("a"), *hits("aaaaaaaa")])
    assert policy.frequency("a") == 3


def test_s3fifo_queues_are_measured_in_bytes() -> None:
    policy = S3FIFOPolicy(1000)  # small: 100 bytes
    play(policy, [ins("big", 90), ins("b", 20)])
    assert policy.small_bytes == 110
    assert play(policy, [ins("c", 900)])[-1] == ["big"]  # small over its share: FIFO order
    assert policy.small_bytes == 920


# ---- SIEVE -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "steps", "evicted", "after"),
    [
        pytest.param(3, [*fill("abc"), ins("d")], [["a"]], "bcd", id="unvisited-oldest-goes"),
        pytest.param(3, [*fill("abc"), *hits("a"), ins("d")], [["b"]], "acd", id="keeps-visited"),
        pytest.param(
            3,
            [*fill("abc"), *hits("a"), ins("d"), *hits("a"), ins("e")],
            [["b"], ["c"]],
            "ade",
            id="hand-resumes-where-it-stopped",
        ),
        pytest.param(
            3, [*fill("abc"), *hits("abc"), ins("d")], [["a"]], "bcd", id="all-visited-wraps"
        ),
        pytest.param(
            4,
            [*fill("abcd"), *hits("ab"), rm("c"), ins("e"), ins("f"), ins("g")],
            [["d"], ["e"]],
            "abfg",
            id="skips-removed-and-sieves-the-new",
        ),
        pytest.param(
            10,
            [ins("a", 4), ins("b", 4), *hits("a"), ins("c", 9)],
            [["b", "a"]],
            "c",
            id="evicts-until-it-fits",
        ),
    ],
)
def test_sieve(capacity: int, steps: list[Step], evicted: list[list[str]], after: str) -> None:
    policy = SIEVEPolicy(capacity)
    assert evictions(policy, steps) == evicted
    assert present(policy) == set(after)


def test_sieve_clears_the_visited_bit_it_passes() -> None:
    policy = SIEVEPolicy(3)
    play(policy, [*fill("abc"), *hits("ab"), ins("d")])
    assert not policy.is_visited("a")
    assert not policy.is_visited("b")
    assert "c" not in policy


def test_sieve_compacts_its_log_without_losing_order() -> None:
    policy = SIEVEPolicy(50)
    rng = random.Random(7)  # noqa: S311 - a seeded test sequence
    for index in range(5_000):
        key = f"k{rng.randrange(200)}"
        if key in policy:
            policy.hit(key)
        else:
            policy.insert(key, 1)
        if index % 3 == 0:
            policy.remove(f"k{rng.randrange(200)}")
        policy.check_invariants()
    assert len(policy._log) <= 2 * len(policy) + 64


# ---- W-TinyLFU -------------------------------------------------------------------------------


# A sketch sized for 100 keys (expected_object_bytes=1) makes collisions negligible here.


def test_tinylfu_refuses_a_cold_key_that_would_displace_frequent_ones() -> None:
    policy = TinyLFUPolicy(100, expected_object_bytes=1)  # window: 1 byte
    hot = [f"hot{i}" for i in range(10)]
    for key in hot:
        policy.insert(key, 10)
    for _ in range(5):
        for key in hot:
            policy.hit(key)
    assert policy.insert("cold", 10) == ["cold"]
    assert present(policy) == set(hot)
    policy.check_invariants()


def test_tinylfu_admits_a_key_once_it_is_more_frequent_than_the_victim() -> None:
    policy = TinyLFUPolicy(100, expected_object_bytes=1)
    for index in range(10):
        policy.insert(f"k{index}", 10)
    assert policy.insert("new", 10) == ["new"]  # frequency 1 against 1: ties go to the victim
    assert policy.insert("new", 10) == ["k0"]  # 2 against 1: probation's LRU key leaves
    assert policy.segment_of("new") == "probation"
    policy.check_invariants()


def test_tinylfu_scan_does_not_flush_the_working_set() -> None:
    policy = TinyLFUPolicy(100)  # sketch grows with the key count, keeping what it knew
    working_set = [f"hot{i}" for i in range(20)]
    for key in working_set:
        policy.insert(key, 1)
    # hot19 is still in the window and meets the scan as a candidate in probation: a count of
    # 11 keeps it clear of the collision noise 1,000 scan keys add to a 100-key sketch.
    for _ in range(10):
        for key in working_set:
            policy.hit(key)
    for index in range(1_000):
        policy.insert(f"scan{index}", 1)
    policy.check_invariants()
    assert set(working_set) <= present(policy)


def test_tinylfu_segments() -> None:
    policy = TinyLFUPolicy(100, window_ratio=0.1)  # window: 10 bytes
    play(policy, [ins("a", 5), ins("b", 5)])
    assert policy.segment_of("a") == "window"
    play(policy, [ins("c", 5)])  # window overflows: a is a candidate, room to spare
    assert policy.segment_of("a") == "probation"
    play(policy, hits("a"))
    assert policy.segment_of("a") == "protected"
    assert policy.segment_of("zzz") is None


def test_count_min_sketch_counts_saturates_and_ages() -> None:
    sketch = CountMinSketch(expected_keys=64)
    for _ in range(5):
        sketch.increment("a")
    assert sketch.frequency("a") >= 5
    assert sketch.frequency("never-seen") <= 1  # collisions may add a little, rarely
    for _ in range(100):
        sketch.increment("a")
    assert sketch.frequency("a") <= 15
    for index in range(10 * sketch.width):
        sketch.increment(f"other{index}")
    assert sketch.frequency("a") < 15  # halved at least once


# ---- size-aware W-TinyLFU --------------------------------------------------------------------

# expected_object_bytes=1 sizes the sketch for capacity_bytes keys, so the estimates of absent
# keys are exact here (a present key's count is exact anyway: it lives in its segment).


def sa_policy(
    capacity: int, window_ratio: float = 0.01, protected_ratio: float = 0.8
) -> SizeAwareTinyLFUPolicy:
    return SizeAwareTinyLFUPolicy(capacity, window_ratio, protected_ratio, expected_object_bytes=1)


def requested(policy: SizeAwareTinyLFUPolicy, key: str, times: int, size_bytes: int) -> None:
    """``times`` requests for ``key`` driven as the edge drives them: hit, or miss and insert."""
    for _ in range(times):
        if key in policy:
            policy.hit(key)
        else:
            policy.insert(key, size_bytes)
        policy.check_invariants()


def test_sa_tinylfu_segments_and_counts() -> None:
    policy = sa_policy(100, window_ratio=0.1)  # window: 10 bytes, main: 90
    play(policy, [ins("a", 5), ins("b", 5)])
    assert policy.segment_of("a") == "window"
    assert policy.frequency("a") == 1
    play(policy, [ins("c", 5)])  # the window overflows; main has room, so a enters it
    assert policy.segment_of("a") == "probation"
    play(policy, hits("aa"))
    assert policy.segment_of("a") == "protected"
    assert policy.frequency("a") == 3
    assert policy.segment_of("zzz") is None
    assert policy.frequency("zzz") == 0


def test_sa_tinylfu_refuses_a_cold_key_that_would_displace_frequent_ones() -> None:
    policy = sa_policy(100, window_ratio=0.0)  # no window: a new key is the candidate
    hot = [f"hot{i}" for i in range(10)]
    for key in hot:
        requested(policy, key, 3, 10)
    assert policy.insert("cold", 10) == ["cold"]
    assert present(policy) == set(hot)
    # Refused, but counted: once it is asked for more often than the victim, it gets in.
    for _ in range(2):
        assert policy.insert("cold", 10) == ["cold"]
    assert policy.insert("cold", 10) == ["hot0"]  # 4 requests against 3: the LRU victim goes
    assert policy.segment_of("cold") == "probation"


def test_sa_tinylfu_large_candidate_must_beat_every_victim_it_displaces() -> None:
    def setup(third_victim_requests: int) -> SizeAwareTinyLFUPolicy:
        # No window, and no protected segment: main's eviction order is plain LRU.
        policy = sa_policy(1_000, window_ratio=0.0, protected_ratio=0.0)
        for index in range(10):  # ten 100-byte keys fill main
            requested(policy, f"small{index}", third_victim_requests if index == 2 else 2, 100)
        return policy

    # A 300-byte candidate displaces the three least recently used small keys, and only them,
    # once it is requested more often than each of them...
    policy = setup(third_victim_requests=2)
    for _ in range(2):
        assert policy.insert("large", 300) == ["large"]
    assert policy.insert("large", 300) == ["small0", "small1", "small2"]  # 3 against 2, 2, 2
    assert policy.used_bytes == 1_000

    # ...but not while one of them is as popular as it is: then nothing at all is evicted.
    policy = setup(third_victim_requests=3)
    for _ in range(3):
        assert policy.insert("large", 300) == ["large"]
    assert present(policy) == {f"small{index}" for index in range(10)}
    assert policy.insert("large", 300) == ["small0", "small1", "small2"]  # 4 against 2, 2, 3


def test_sa_tinylfu_candidate_larger_than_main_is_refused() -> None:
    policy = sa_policy(100)  # window: 1 byte, main: 99
    assert policy.insert("a", 100) == ["a"]
    assert policy.insert("b", 99) == []
    assert policy.main_bytes == 99


def test_sa_tinylfu_main_keeps_its_budget_so_new_keys_cannot_push_out_admitted_ones() -> None:
    # Keys larger than the window pass straight through it. If main could take the window's
    # share too (as in TinyLFUPolicy), a later small key landing in the window, which has room,
    # would push the cache over capacity with no candidate to compare: an admitted key would
    # be evicted unconditionally.
    policy = sa_policy(1_000, window_ratio=0.1)  # window: 100 bytes, main: 900
    hot = [f"hot{i}" for i in range(5)]
    for _ in range(3):
        for key in hot:
            requested(policy, key, 1, 200)
    assert policy.main_bytes <= policy.main_target_bytes
    admitted = present(policy)
    assert len(admitted) == 4  # the fifth never beat the victim it would displace (ties)
    for index in range(10):
        assert policy.insert(f"new{index}", 10) == []
    assert admitted <= present(policy)


def test_sa_tinylfu_frequent_keys_survive_a_flood_of_one_off_keys_of_any_size() -> None:
    rng = random.Random(3)  # noqa: S311 - a seeded test sequence
    for policy in (sa_policy(1_000), SizeAwareTinyLFUPolicy(1_000)):  # exact, and small sketch
        hot = [f"hot{i}" for i in range(9)]
        for key in hot:
            requested(policy, key, 4, 100)
        for index in range(300):
            policy.insert(f"flood{index}", rng.choice([1, 5, 30, 100, 250, 600]))
            policy.check_invariants()
        assert set(hot) <= present(policy)


def test_sa_tinylfu_scan_does_not_flush_the_working_set() -> None:
    policy = SizeAwareTinyLFUPolicy(100)  # a sketch that grows with the key count, and ages
    working_set = [f"hot{i}" for i in range(20)]
    for key in working_set:
        requested(policy, key, 11, 1)
    for index in range(1_000):
        policy.insert(f"scan{index}", 1)
    policy.check_invariants()
    assert set(working_set) <= present(policy)


def test_sa_tinylfu_counts_age_and_a_leaving_key_is_remembered() -> None:
    policy = sa_policy(100)
    requested(policy, "a", 9, 1)
    assert policy.frequency("a") == 9
    policy.remove("a")  # a purge: the URL is as popular as it was
    assert policy.frequency("a") == 9
    assert policy.insert("a", 1) == []
    assert policy.frequency("a") == 10
    # Within sample_size counted requests every count is halved, the present keys' too.
    for index in range(policy.sample_size):
        policy.insert(f"once{index}", 1)
    assert "a" in policy  # one-off keys never outweigh it
    assert policy.frequency("a") <= 5


def test_history_sketch_counts_saturates_records_and_halves() -> None:
    sketch = HistorySketch(expected_keys=64)
    assert [sketch.add("a") for _ in range(3)] == [0, 1, 2]  # the estimate before each request
    assert sketch.estimate("a") == 3
    for _ in range(100):
        sketch.add("a")
    assert sketch.estimate("a") == 15
    sketch.record("b", 7)
    sketch.record("b", 2)  # raises only
    assert sketch.estimate("b") == 7
    sketch.halve()
    assert (sketch.estimate("a"), sketch.estimate("b")) == (7, 3)
    assert sketch.estimate("never-seen") <= 1  # collisions may add a little, rarely


# ---- every policy: edge cases as a table -----------------------------------------------------

ALL = pytest.mark.parametrize("name", POLICY_NAMES)


@ALL
def test_larger_than_capacity_is_refused(name: str) -> None:
    policy = make_policy(name, 100)
    assert policy.insert("a", 60) == []
    assert policy.insert("huge", 101) == ["huge"]
    assert "huge" not in policy
    assert present(policy) == {"a"}
    assert policy.used_bytes == 60


@ALL
def test_reinsert_beyond_capacity_drops_the_key(name: str) -> None:
    policy = make_policy(name, 100)
    policy.insert("a", 60)
    assert policy.insert("a", 101) == ["a"]
    assert "a" not in policy
    assert policy.used_bytes == 0


@ALL
def test_reinsert_updates_size(name: str) -> None:
    policy = make_policy(name, 100)
    policy.insert("a", 30)
    policy.insert("b", 30)
    assert policy.insert("a", 50) == []
    assert policy.used_bytes == 80
    assert len(policy) == 2
    assert policy.insert("a", 10) == []
    assert policy.used_bytes == 40


@ALL
def test_reinsert_that_grows_evicts_others_to_fit(name: str) -> None:
    policy = make_policy(name, 100)
    for key in "abcd":
        policy.insert(key, 20)
    evicted = policy.insert("a", 70)
    assert policy.used_bytes <= 100
    assert evicted
    assert all(key not in policy for key in evicted)
    assert sum(20 for key in "bcd" if key in policy) + (70 if "a" in policy else 0) == (
        policy.used_bytes
    )


@ALL
def test_remove_unknown_key_is_a_no_op(name: str) -> None:
    policy = make_policy(name, 100)
    policy.insert("a", 10)
    policy.remove("nope")
    assert present(policy) == {"a"}
    assert policy.used_bytes == 10
    policy.remove("a")
    policy.remove("a")
    assert len(policy) == 0
    assert policy.used_bytes == 0


@ALL
def test_hit_on_absent_key_raises_and_changes_nothing(name: str) -> None:
    policy = make_policy(name, 100)
    policy.insert("a", 10)
    with pytest.raises(KeyError):
        policy.hit("nope")
    assert present(policy) == {"a"}
    assert policy.used_bytes == 10


@ALL
def test_zero_sized_objects_and_zero_capacity(name: str) -> None:
    policy = make_policy(name, 0)
    assert policy.insert("empty", 0) == []
    assert policy.insert("one", 1) == ["one"]
    assert present(policy) == {"empty"}
    assert policy.used_bytes == 0


@ALL
def test_negative_sizes_are_rejected(name: str) -> None:
    policy = make_policy(name, 100)
    with pytest.raises(ValueError, match="size_bytes"):
        policy.insert("a", -1)
    with pytest.raises(ValueError, match="capacity_bytes"):
        make_policy(name, -1)


@ALL
def test_keys_is_a_snapshot(name: str) -> None:
    policy = make_policy(name, 100)
    for key in "abc":
        policy.insert(key, 10)
    snapshot = policy.keys()
    for key in snapshot:
        policy.remove(key)
    assert len(policy) == 0


@ALL
def test_factory_builds_a_protocol_conforming_policy(name: str) -> None:
    policy = make_policy(name, 1_000)
    assert isinstance(policy, EvictionPolicy)
    assert policy.capacity_bytes == 1_000
    assert len(policy) == 0
    assert policy.used_bytes == 0


def test_factory_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown eviction policy 'arc'"):
        make_policy("arc", 100)


def test_policy_classes_by_name() -> None:
    expected: dict[str, type[SizeBookedPolicy]] = {
        "lru": LRUPolicy,
        "s3fifo": S3FIFOPolicy,
        "sieve": SIEVEPolicy,
        "tinylfu": TinyLFUPolicy,
        "tinylfu-sa": SizeAwareTinyLFUPolicy,
    }
    assert {name: type(make_policy(name, 1)) for name in POLICY_NAMES} == expected


# ---- every policy: random sequences, invariants after every operation ------------------------

SIZE_CHOICES: list[Callable[[random.Random], int]] = [
    lambda rng: 1,  # unit sizes: a count-bounded cache
    lambda rng: rng.choice([0, 1, 3, 10, 40]),  # a few classes, with zero-sized objects
    lambda rng: int(rng.lognormvariate(3, 1.2)),  # heavy tail, sometimes above capacity
]


def check_against_model(policy: EvictionPolicy, model: dict[str, int], capacity: int) -> None:
    keys = list(policy.keys())
    assert len(keys) == len(set(keys)), "a key is present twice"
    assert set(keys) == model.keys()
    assert len(policy) == len(model)
    assert policy.used_bytes == sum(model.values()) <= capacity
    assert all(key in policy for key in model)
    assert isinstance(policy, SizeBookedPolicy)
    assert all(policy.size_of(key) == size for key, size in model.items())
    policy.check_invariants()


@ALL
@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_the_invariants(name: str, seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - a seeded test sequence
    capacity = rng.choice([0, 1, 50, 200, 1_000])
    draw_size = SIZE_CHOICES[seed % len(SIZE_CHOICES)]
    universe = rng.choice([5, 40, 300])
    policy = make_policy(name, capacity)
    model: dict[str, int] = {}  # what must be present, with sizes
    for _ in range(1_500):
        key = f"k{int(rng.paretovariate(1.0) * 7) % universe}"
        roll = rng.random()
        if roll < 0.55:  # the edge's lookup: hit or miss-and-insert
            if key in policy:
                policy.hit(key)
            else:
                size_bytes = draw_size(rng)
                evicted = policy.insert(key, size_bytes)
                check_insert(policy, model, key, size_bytes, evicted, was_present=False)
        elif roll < 0.70:  # a revalidation that changed the body: re-insert, maybe present
            size_bytes = draw_size(rng)
            evicted = policy.insert(key, size_bytes)
            check_insert(policy, model, key, size_bytes, evicted, was_present=key in model)
        elif roll < 0.85:
            policy.remove(key)
            model.pop(key, None)
        elif roll < 0.95 and model:
            policy.hit(rng.choice(sorted(model)))
        else:
            absent = f"absent{rng.randrange(1_000)}"
            with pytest.raises(KeyError):
                policy.hit(absent)
        check_against_model(policy, model, capacity)


def check_insert(
    policy: EvictionPolicy,
    model: dict[str, int],
    key: str,
    size_bytes: int,
    evicted: list[str],
    *,
    was_present: bool,
) -> None:
    assert len(evicted) == len(set(evicted)), f"evicted twice: {evicted}"
    assert all(victim in model or victim == key for victim in evicted), "evicted a stranger"
    if size_bytes > policy.capacity_bytes:
        assert evicted == [key]
    model[key] = size_bytes
    for victim in evicted:
        del model[victim]
        assert victim not in policy
    assert (key in policy) == (key not in evicted)
    if not was_present and key not in evicted:
        assert policy.used_bytes >= size_bytes
