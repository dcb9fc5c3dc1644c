"""The autotuner's search (knl_train/autotune/search.py): greedy and grid against a fake measure."""

from __future__ import annotations

from knl_train.autotune.search import greedy, grid, grid_candidates
from knl_train.autotune.space import Candidate, Machine, Space, effective, label

TWO_CORES = Machine(cores=2, itex="optional", host="box", cpu="test CPU")


def fake_measure(rate, log=None):
    """A measure whose 'images/s' is ``rate(candidate)`` every time (search logic only)."""
    seen = {}

    def measure(group, dimension):
        if log is not None:
            log.append((dimension, list(group)))
        for c in group:
            seen.setdefault(c, []).append(rate(c))
        return {c: seen[c] for c in group}
    return measure


def rate(c: Candidate) -> float:
    r = 20.0
    r *= 2.0 if c.precision == "mixed_bf16" else 1.0
    r *= 0.5 if not c.onednn else 1.0
    r *= 1.2 if c.itex else 1.0
    r *= 0.9 if c.ranks == 2 else 1.0
    r *= 1.05 if c.inter_op == 1 else 1.0
    r *= 1.1 if c.itex and c.blocktime == 0 else 1.0
    return r


def test_greedy_walks_the_dimensions_in_order_and_keeps_only_gains():
    log = []
    space = Space(precision=("fp32", "mixed_bf16"), ranks=(1, 2))
    search = greedy(space, TWO_CORES, 16, fake_measure(rate, log))
    # Precision last: the stage before it ends on the best fp32 setting.
    assert [d for d, _ in log] == ["onednn", "itex", "ranks", "inter_op", "blocktime", "precision"]
    for _, group in log:   # the incumbent first, then only real changes
        assert len({effective(c, TWO_CORES) for c in group}) == len(group)
    assert search.final == Candidate(precision="mixed_bf16", itex=True, inter_op=1, blocktime=0)
    assert label(search.final, TWO_CORES) == "bf16, ITEX, inter-op 1, blocktime 0"
    assert [s.chosen != s.incumbent for s in search.stages] == [False, True, False, True, True, True]
    assert search.stages[-1].incumbent == Candidate(itex=True, inter_op=1, blocktime=0)
    # inter-op 2 is what TF does on a 1-rank, 2-core node: not measured again
    inter = next(g for d, g in log if d == "inter_op")
    assert [effective(c, TWO_CORES).inter_op for c in inter] == [2, 1]
    # spare cores never: a fifth of 2 cores is no core; threads per core: the node has 1
    assert ("spare_cores", "1") in {(d, v) for d, v, _ in search.skipped}


def test_greedy_min_gain_and_blocktime_only_with_itex():
    log = []
    search = greedy(Space(itex=(False,)), TWO_CORES, 16,
                             fake_measure(lambda c: rate(c) * (1.02 if c.ranks == 2 else 1), log),
                             min_gain=0.1)
    assert search.final.baseline              # inter-op 1 gains 5%, 2 ranks lose 8%
    assert "blocktime" not in [d for d, _ in log]
    assert "itex" not in [d for d, _ in log]


def test_greedy_takes_a_failed_incumbent_over_nothing():
    search = greedy(Space(onednn=(True,), itex=(False,), ranks=(1,), inter_op=(1,)),
                             TWO_CORES, 16, lambda group, dim: {group[0]: [], group[1]: [30.0]})
    assert search.final == Candidate(inter_op=1)


def test_candidates_skip_what_cannot_run():
    m = Machine(cores=6, itex="absent")
    cands, skipped = grid_candidates(Space(ranks=(1, 2, 4), inter_op=(1,)), m, 12)
    why = {(d, v): w for d, v, w in skipped}
    assert "do not divide" in why[("ranks", "4")]
    assert "not installed" in why[("itex", "on")]
    assert cands[0].baseline and all(not c.itex and c.ranks in (1, 2) for c in cands)
    # batch 10 splits over 2 ranks but not over 3; Xeon Phi never gets ITEX
    knl = Machine(cores=6, itex="optional", is_knl=True)
    _, skipped = grid_candidates(Space(ranks=(2, 3)), knl, 10)
    why = {(d, v): w for d, v, w in skipped}
    assert "does not split" in why[("ranks", "3")] and "Xeon Phi" in why[("itex", "on")]


def test_grid_is_the_deduplicated_product():
    space = Space(onednn=(True,), itex=(False, True), ranks=(1, 2), spare_cores=(0,),
                  inter_op=(1, 2), blocktime=(0, 1))
    cands, _ = grid_candidates(space, TWO_CORES, 16)
    runs = [effective(c, TWO_CORES) for c in cands]
    assert len(set(runs)) == len(runs)
    # without ITEX blocktime is not read: 1 + 3 (1 rank x inter 1; 2 ranks x inter 1, 2) ...
    assert sum(not c.itex for c in cands) == 4
    # ... with ITEX it is: 4 layout and inter-op combinations x 2 blocktimes
    assert sum(c.itex for c in cands) == 8
    search = grid(space, TWO_CORES, 16, fake_measure(rate))
    assert effective(search.final, TWO_CORES) == effective(
        Candidate(itex=True, inter_op=1, blocktime=0), TWO_CORES)
