"""Replicas learning together over torch.distributed: gloo on loopback, 3 processes.

One multi-process run (the module fixture) plays every scenario; each test checks one promise
against it: bit-identical replicas, equality with one learner that observed all the traffic,
ranks without tokens, NaN on one rank, one bucketed all-reduce per step, refusal of a replica
whose state differs, recovery from the shared state file, and asynchronous mode.
"""

import time

import pytest
import torch

import fastcl
from distributed_workers import NAN_STEP, STEPS, launch, patched, run_traffic, scenarios
from helpers import assert_close

WORLD = 3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    start = time.perf_counter()
    results = launch(scenarios, WORLD, tmp_path_factory.mktemp("dist"))
    print(f"\n{WORLD}-process gloo run: {time.perf_counter() - start:.1f}s")
    return results


@pytest.fixture(scope="module")
def single():
    """One learner that observed the concatenated traffic of all the replicas."""
    return run_traffic(patched(), list(range(WORLD)), STEPS)


def assert_identical(tensors_by_rank, what):
    first = tensors_by_rank[0]
    for rank, tensors in enumerate(tensors_by_rank[1:], start=1):
        for name in first:
            a, b = first[name], tensors[name]
            if not torch.equal(a, b):
                diff = (a - b).abs().max().item()
                raise AssertionError(f"{what}: rank {rank} differs from rank 0 at {name} (max |diff| {diff:.3g})")


def test_replicas_hold_bit_identical_fast_weights_and_weights(ranks):
    for step in range(STEPS):
        assert_identical([r["sync"]["B"][step] for r in ranks], f"B after step {step}")
        assert_identical([r["sync"]["W"][step] for r in ranks], f"W after step {step}")
    assert ranks[0]["counters"]["epoch"] == 1, "the run must cover a consolidation"


def test_replicas_equal_one_learner_on_the_concatenated_traffic(ranks, single):
    assert ranks[0]["sync"]["applied"] == single["applied"]
    for step in range(STEPS):
        for name, expected in single["B"][step].items():
            assert_close(ranks[0]["sync"]["B"][step][name], expected, what=f"B {name} after step {step}")
        for name, expected in single["W"][step].items():
            assert_close(ranks[0]["sync"]["W"][step][name], expected, what=f"W {name} after step {step}")
    # The comparison has teeth: learning moved B, and the consolidation moved W.
    assert any(b.abs().max() > 1e-3 for b in single["B"][1].values())
    assert any(not torch.equal(single["W"][0][n], single["W"][-1][n]) for n in single["W"][0])


def test_every_rank_steps_even_without_tokens(ranks):
    # Step 0: rank 2 served nothing, yet it applies the group's update; step 2: nobody served.
    for r in ranks:
        assert r["sync"]["applied"][0] is True
        assert r["sync"]["applied"][2] is False


def test_nan_on_one_rank_skips_the_step_on_every_rank(ranks):
    for rank, r in enumerate(ranks):
        assert r["sync"]["applied"][NAN_STEP] is False, f"rank {rank} applied a step another rank refused"
        assert r["counters"]["skipped_steps"] == 1
        for name, before in r["sync"]["B"][NAN_STEP - 1].items():
            assert torch.equal(r["sync"]["B"][NAN_STEP][name], before), f"rank {rank} changed {name}"


def test_a_step_sends_one_flat_buffer_not_a_call_per_layer(ranks):
    one = ranks[0]["one_step"]
    assert one["layers"] == 14
    # Counted at torch.distributed: (call, bytes of the tensor this rank sends).
    assert one["calls"] == [("all_gather", 3 * 8), ("all_reduce", one["accumulator_bytes"])]


def test_a_rank_with_a_stale_state_is_refused_with_a_clear_error(ranks):
    message, bad = ranks[2]["stale"]
    assert bad == [2]
    assert "rank(s) [2] of 3 differ" in message and "fast weights (B) at model.layers.0" in message
    assert "refuses to step or consolidate" in message
    for rank in (0, 1):
        message, bad = ranks[rank]["stale"]
        assert bad == [2] and "agrees with the majority" in message
    assert "refuses to step" in ranks[2]["refused_step"]


def test_a_rank_patched_with_another_seed_is_refused(ranks):
    for r in ranks:
        message, bad = r["other_seed"]
        assert bad == [2] and "differ from the group (held by rank(s) [0, 1]) in config" in message


def test_a_rank_restarted_from_the_shared_state_rejoins_in_lockstep(ranks):
    assert all(r["rejoined"] for r in ranks)
    # The file held rank 0's pending gradient; the restarted rank starts with empty accumulators.
    assert ranks[2]["loaded_pending"] == (0.0, 0)
    assert ranks[2]["after_recovery"]["refusal"] is None
    assert_identical([r["after_recovery"]["B"] for r in ranks], "B after recovery")
    assert_identical([r["after_recovery"]["W"] for r in ranks], "W after recovery")


def test_async_sgd_syncing_every_step_equals_synchronous_learning(ranks):
    # Token-weighted averaging of B after local SGD steps is the same update as one SGD step on
    # the summed accumulators, so this pins down the asynchronous averaging.
    single = run_traffic(patched(optimizer="sgd", lr=0.5), list(range(WORLD)), 4, inject_nan=False)
    for step in range(4):
        assert_identical([r["async_sgd"]["B"][step] for r in ranks], f"async SGD B after step {step}")
        for name, expected in single["B"][step].items():
            assert_close(ranks[0]["async_sgd"]["B"][step][name], expected, what=f"async SGD {name} step {step}")


def test_async_adam_drifts_between_syncs_and_agrees_at_each(ranks, capsys):
    runs = [r["async_adam"]["B"] for r in ranks]
    assert any(not torch.equal(runs[0][0][n], runs[1][0][n]) for n in runs[0][0]), "step 0 must be local"
    for step in (1, 3):  # sync_every=2: calls 2 and 4 average
        assert_identical([run[step] for run in runs], f"async Adam B after step {step}")
    assert_identical([r["async_adam_W"] for r in ranks], "async Adam W after consolidate")
    # The error asynchronous mode introduces, against synchronous learning (reported, not bounded).
    single = run_traffic(patched(), list(range(WORLD)), 4, inject_nan=False)
    num = sum((runs[0][3][n] - b).pow(2).sum() for n, b in single["B"][3].items())
    den = sum(b.pow(2).sum() for b in single["B"][3].values())
    with capsys.disabled():
        print(f"\nasync Adam sync_every=2, 4 steps, {WORLD} replicas: ||B - B_sync|| / ||B_sync|| = "
              f"{(num / den).sqrt().item():.3f}")


# ----------------------------------------------------------------------------- in one process
def test_inner_steps_stop_together_when_one_rank_has_nothing_to_learn(ranks):
    assert [r["inner"]["steps"] for r in ranks] == [4] * WORLD  # the scheduled step and 3 inner steps
    assert_identical([r["inner"]["W"] for r in ranks], "W after learn() with inner steps")
    # Asynchronous replicas: rank 1 applies nothing, yet takes every round, so the syncs line up.
    assert [r["inner_async"]["steps"] for r in ranks] == [4, 0, 4]
    assert len({r["inner_async"]["syncs"] for r in ranks}) == 1
    assert_identical([r["inner_async"]["W"] for r in ranks], "W after asynchronous learn() with inner steps")


def test_alone_the_learner_never_communicates():
    learner = patched()
    assert learner.replicas.group is None and learner.replicas.world_size == 1
    learner.verify_replicas()  # nothing to compare with: a no-op
    learner.observe(torch.randint(0, 97, (1, 6)))
    assert learner.step() and learner.replicas.stats.collectives == 0


def test_bad_distributed_options_are_refused_before_the_model_changes():
    from helpers import tiny_model

    model = tiny_model("llama")
    with pytest.raises(fastcl.FastclError, match="process_group takes a torch.distributed ProcessGroup"):
        fastcl.patch(model, process_group=True)
    with pytest.raises(ValueError, match="sync_every must be None"):
        fastcl.patch(model, sync_every=0)
    assert not hasattr(model, "fastcl")


def test_bytes_per_step_counts_the_patched_accumulators():
    from fastcl.distributed import bytes_per_step

    learner = patched(rank=4)
    counted = bytes_per_step(learner)
    # llama tiny: per block q, o 48x48; k, v 48->24; gate, up 48->72; down 72->48.
    d_outs = [48, 24, 24, 48, 72, 72, 48] * 2
    d_ins = [48] * 6 + [72]
    assert counted["fastcl_sync"] == sum(d_outs) * 4 * 4 + 24
    assert counted["full_gradient"] == sum(o * i for o, i in zip(d_outs, d_ins * 2)) * 4


# ----------------------------------------------------------------------------- a fitted A in blocks
def test_the_default_preset_fits_one_block_of_a_a_replica(ranks):
    for rank, result in enumerate(ranks):
        run = result["fitted_blocks"]["all"]
        assert run["blocks"], "the default preset must fit the MLP layers' A in a group"
        for name, (first, rows) in run["blocks"].items():
            assert (first, rows, run["ranks"][name]) == (rank * 4, 4, 4 * WORLD), name
        assert all(r == 4 for n, r in run["ranks"].items() if n not in run["blocks"])
        assert any(f"rank {rank}" in n for n in run["notes"]), run["notes"]


def test_each_replica_learns_in_its_own_block_as_it_would_without_the_others(ranks):
    for rank, result in enumerate(ranks):
        runs = result["fitted_blocks"]
        for name, (first, rows) in runs["all"]["blocks"].items():
            local, grad = runs["all"]["A_local"][name], runs["all"]["grad_B"][name]
            outside = torch.ones(local.shape[0], dtype=torch.bool)
            outside[first:first + rows] = False
            assert not local[outside].any() and not grad[:, outside].any(), name
            # The others' traffic changes nothing in this replica's fit or gradient.
            assert torch.equal(local, runs[rank]["A_local"][name]), name
            assert torch.equal(grad, runs[rank]["grad_B"][name]), name
        assert sum(float(g.norm()) for g in runs["all"]["grad_B"].values()) > 0


def test_the_first_applied_step_gathers_every_replicas_block(ranks):
    names = list(ranks[0]["fitted_blocks"]["all"]["blocks"])
    for learning in ["all"] + list(range(WORLD)):
        runs = [r["fitted_blocks"][learning] for r in ranks]
        assert all(run["applied"] for run in runs)
        for key in ("A", "B", "W"):
            assert_identical([run[key] for run in runs], f"{key} after the round where {learning} learned")
        for name in names:
            for rank, run in enumerate(runs):
                rows = slice(4 * rank, 4 * rank + 4)
                assert torch.equal(runs[0]["A"][name][rows], run["A_local"][name][rows]), (learning, name, rank)
                if learning not in ("all", rank):  # a block nobody learned in: no gradient, no step
                    assert not runs[0]["B"][name][:, rows].any(), (learning, name, rank)
    # One all-reduce of the random-A layers, one all-gather of the blocks: what bytes_per_step counts.
    for result in ranks:
        run = result["fitted_blocks"]["all"]
        assert run["step_bytes"] == run["predicted_bytes"] > 0
    # Every replica merged every replica's request: all the students' losses fell on every rank.
    for rank, result in enumerate(ranks):
        before, after = result["fitted_blocks"]["all"]["losses"]
        assert all(a < b for a, b in zip(after, before)), (rank, before, after)
        alone_before, alone_after = result["fitted_blocks"][0]["losses"]
        assert after[1] < alone_after[1] - 1e-4  # rank 1's request is learned only when rank 1 learns


def test_a_replicas_block_steps_as_a_lone_learners_would_on_its_request(ranks):
    """Its gradient divided by its own tokens, not the group's: under Adam's eps a group's mean
    would learn each request less the more replicas there are (the ranks learn 3, 4, 5 tokens)."""
    together = ranks[0]["fitted_blocks"]["all"]
    moved = 0.0
    for name, (first, rows) in together["blocks"].items():
        for rank in range(WORLD):
            alone = ranks[0]["fitted_blocks"][rank]
            block = slice(4 * rank, 4 * rank + 4)
            torch.testing.assert_close(together["B"][name][:, block], alone["B"][name][:, block], msg=name)
            moved += float(alone["B"][name][:, block].abs().sum())
    assert moved > 0


def test_a_replica_patched_for_another_group_is_refused_by_every_rank_at_the_step(ranks):
    for result in ranks:
        message, bad = result["fitted_blocks"]["mislaid"]
        assert bad == [WORLD - 1]
        assert f"replica(s) [{WORLD - 1}] of {WORLD} hold fitted layers laid out for another group" in message
