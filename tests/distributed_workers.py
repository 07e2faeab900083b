"""Multi-process harness for tests/test_distributed.py: gloo on loopback, bounded in time.

Each rank runs the same scenario script and saves what it saw; the test process compares the
ranks with each other and with one learner that observed all the traffic.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta

import torch

PG_TIMEOUT_S = 30  # a hung collective raises after this, instead of hanging CI
RUN_TIMEOUT_S = 150  # the whole multi-process run


def launch(worker, world_size: int, tmp_path, *args, timeout: float = RUN_TIMEOUT_S) -> list:
    """Run worker(rank, world_size, tmp_path, *args) in world_size processes; return each rank's
    result (whatever it saved with save_result). Kills the processes and fails past `timeout`."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_entry, args=(worker, world_size, str(tmp_path), args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed run did not finish in {timeout}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = []
    for rank in range(world_size):
        result = torch.load(os.path.join(tmp_path, f"result{rank}.pt"), weights_only=False)
        if "error" in result:
            raise AssertionError(f"rank {rank} failed:\n{result['error']}")
        results.append(result)
    return results


def _entry(rank, worker, world_size, tmp, args):
    import torch.distributed as dist

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        result = worker(rank, world_size, tmp, *args)
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(tmp, f"result{rank}.pt"))
    # No barrier here: a rank that failed must not wait for the others before reporting.
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the traffic
def traffic(step: int, rank: int) -> list[torch.Tensor]:
    """Requests rank `rank` serves before step `step`; uneven on purpose: sizes differ per rank,
    rank 2 serves nothing before step 0, and nobody serves anything before step 2."""
    from helpers import random_ids

    if step == 2 or (step == 0 and rank == 2):
        return []
    count = 1 + (rank + step) % 2
    return [random_ids(batch=1 + (rank + i) % 2, seq=5 + 3 * rank + i, seed=1000 * step + 10 * rank + i)
            for i in range(count)]


NAN_STEP = 3  # before this step rank 1's accumulators hold a NaN
STEPS = 5
CONSOLIDATE_AFTER = 3  # consolidate() after step 3 (the NaN step), so step 4 runs on epoch 1


def patched(**kw):
    import fastcl
    from helpers import tiny_model

    model = tiny_model("llama")
    kw.setdefault("rank", 4)
    kw.setdefault("lr", 1e-2)
    # fp32 input gradients: the replicas must equal one learner to fp32 rounding, and bf16 products
    # (backward_dtype="auto" on CPUs with native bf16) round differently per shard of the traffic.
    kw.setdefault("backward_dtype", None)
    return fastcl.patch(model, **kw)


def fast_weights(learner) -> dict:
    return {name: m.B.detach().clone() for name, m in learner.modules.items()}


def weights(learner) -> dict:
    return {name: m.weight.detach().clone() for name, m in learner.modules.items()}


def run_traffic(learner, ranks: list[int], steps: int, inject_nan: bool = True) -> dict:
    """Serve the traffic of `ranks` and step on the shared schedule. A replica passes its own
    rank; the single learner every replica must match passes all of them (the concatenated
    traffic)."""
    out = {"applied": [], "B": [], "W": []}
    for step in range(steps):
        for rank in ranks:
            for ids in traffic(step, rank):
                learner.observe(ids)
        if inject_nan and step == NAN_STEP and 1 in ranks:
            next(iter(learner.modules.values())).grad_B[0, 0] = float("nan")
        out["applied"].append(learner.step())
        out["B"].append(fast_weights(learner))
        if inject_nan and step == CONSOLIDATE_AFTER:
            learner.consolidate()
        out["W"].append(weights(learner))
    return out


# ----------------------------------------------------------------------------- scenarios
def scenarios(rank, world_size, tmp):
    """Synchronous learning, recovery from a state file, refusal of mismatched replicas, async."""
    import torch.distributed as dist

    import fastcl

    result = {}
    learner = patched()
    before = learner.replicas.stats.collectives
    sync = run_traffic(learner, [rank], STEPS)
    result["sync"] = sync
    result["sync_stats"] = dict(learner.replicas.stats.__dict__)
    result["sync_collectives"] = learner.replicas.stats.collectives - before
    result["counters"] = dict(learner.counters.__dict__)

    # Collectives per step, counted where torch.distributed is called: one gather of counts,
    # one reduce of every layer's accumulator.
    learner.observe(traffic(0, 0)[0])
    calls = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast", "reduce")}
    for name, fn in originals.items():
        def counted(tensor_or_list, *args, _name=name, _fn=fn, **kwargs):
            tensor = tensor_or_list[0] if isinstance(tensor_or_list, list) else tensor_or_list
            calls.append((_name, tensor.numel() * tensor.element_size()))
            return _fn(tensor_or_list, *args, **kwargs)
        setattr(dist, name, counted)
    try:
        learner.step()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    result["one_step"] = {"calls": calls,
                          "accumulator_bytes": sum(m.grad_B.numel() * 4 for m in learner.modules.values()),
                          "layers": len(learner.modules)}

    # A replica restarted from the shared state file rejoins; one from a stale file is refused.
    if rank == 0:
        learner.save(os.path.join(tmp, "stale.safetensors"))
    learner.observe(traffic(1, rank)[0])
    learner.step()
    learner.observe(traffic(1, rank)[0])  # saved with a pending gradient: rank 0's own, not the group's
    if rank == 0:
        learner.save(os.path.join(tmp, "shared.safetensors"))
    dist.barrier()
    if rank == 2:
        learner = patched()  # a fresh process's learner
        learner.load(os.path.join(tmp, "shared.safetensors"))  # verifies with the group
        result["loaded_pending"] = (max(float(m.grad_B.abs().max()) for m in learner.modules.values()),
                                    learner.counters.tokens_pending)
    else:
        learner.verify_replicas()
    result["rejoined"] = True

    try:
        if rank == 2:
            learner.load(os.path.join(tmp, "stale.safetensors"))
        else:
            learner.verify_replicas()
        result["stale"] = None
    except fastcl.ReplicaMismatchError as exc:
        result["stale"] = (str(exc), exc.ranks)
    if rank == 2:
        try:  # refused locally, before any collective, so the healthy ranks are not involved
            learner.step()
            result["refused_step"] = None
        except fastcl.ReplicaMismatchError as exc:
            result["refused_step"] = str(exc)

    try:  # a replica patched with another seed would regenerate other projections
        other = patched(seed=1) if rank == 2 else learner
        other.verify_replicas()
        result["other_seed"] = None
    except fastcl.ReplicaMismatchError as exc:
        result["other_seed"] = (str(exc), exc.ranks)

    # Rank 2 reloads the group's state, passes the check, and learns in lockstep again.
    if rank == 2:
        learner.load(os.path.join(tmp, "shared.safetensors"))
    else:
        learner.verify_replicas()
    learner.observe(traffic(0, rank)[0] if traffic(0, rank) else traffic(1, rank)[0])
    learner.step()
    learner.consolidate()
    result["after_recovery"] = {"B": fast_weights(learner), "W": weights(learner),
                                "refusal": learner.replicas.refusal}

    # Asynchronous mode. SGD with sync_every=1 must equal synchronous learning; Adam with
    # sync_every=2 drifts between syncs and is identical at each sync.
    sgd = patched(optimizer="sgd", lr=0.5, sync_every=1)
    result["async_sgd"] = run_traffic(sgd, [rank], 4, inject_nan=False)
    adam = patched(sync_every=2)
    result["async_adam"] = run_traffic(adam, [rank], 4, inject_nan=False)
    adam.consolidate()
    result["async_adam_W"] = weights(adam)

    # learn() with inner steps: rank 1 has nothing to learn (its teacher is far below the student)
    # while the others never close their gain; every rank must step as often as the group does.
    from helpers import random_ids

    teacher, student, response = (random_ids(1, n, seed=7000 + 10 * rank + n)[0].tolist() for n in (9, 4, 5))
    floor = -1e3 if rank == 1 else 0.0
    for mode, options in (("inner", {}), ("inner_async", {"sync_every": 1})):
        contextual = patched(inner_steps=3, **options)
        contextual.learn(teacher, response, student, teacher_logprobs=torch.full((len(response),), floor))
        result[mode] = {"steps": contextual.counters.steps, "syncs": contextual.replicas.stats.syncs,
                        "W": weights(contextual)}

    result["fitted_blocks"] = fitted_blocks(rank, world_size)
    return result


# ----------------------------------------------------------------------------- a fitted A in blocks
def block_request(rank: int) -> tuple[list[int], list[int], list[int]]:
    """(teacher, response, student) of rank `rank`: its own entity, context and answer, the
    answer one token longer a rank (the replicas learn different token counts)."""
    head, tail = [1, 2], [5]
    entity, context = [40 + 3 * rank, 41 + 3 * rank], [10 + 5 * rank + i for i in range(3 + rank)]
    student = head + [3] + entity + [4] + tail
    return head + context + student[len(head):], context, student


def block_learner():
    """The default preset (the MLP keyed to the entity in a fitted A), every response token learned."""
    import fastcl
    from helpers import tiny_model
    from test_protection import CharTokenizer

    return fastcl.patch(tiny_model("llama"), rank=4, tokenizer=CharTokenizer(), gate_tolerance=None,
                        backward_dtype=None, grounded=False, gain_threshold=-float("inf"), replay=0,
                        replay_per_step=0, step_every=0, consolidate_every=0)


def student_losses(learner, world_size: int) -> list[float]:
    from fastcl.batching import prompt_response_batch

    losses = []
    with torch.no_grad():
        for r in range(world_size):
            _, response, student = block_request(r)
            batch = prompt_response_batch([student], [response], 0, learner.device)
            logits = learner.model(input_ids=batch.input_ids).logits[batch.rows, batch.cols].float()
            losses.append(float(torch.nn.functional.cross_entropy(logits, batch.targets)))
    return losses


def fitted_blocks(rank: int, world_size: int) -> dict:
    """One round of the default preset in which every rank learns its own request ("all"), and
    one per rank in which only that rank does ("alone": the others call step() with nothing)."""
    runs = {}
    for learning in ["all"] + list(range(world_size)):
        learner = block_learner()
        blocks = {name: m.fit_block for name, m in learner.modules.items() if m.fit_block is not None}
        before = student_losses(learner, world_size)
        if learning in ("all", rank):
            learner.learn(*block_request(rank))
        run = {"grad_B": {n: learner.modules[n].grad_B.clone() for n in blocks},
               "A_local": {n: learner.modules[n].A.clone() for n in blocks}}
        from fastcl.distributed import bytes_per_step

        run["predicted_bytes"] = bytes_per_step(learner, world_size)["fastcl_sync"]
        sent = learner.replicas.stats.bytes_sent
        run["applied"] = learner.step()
        run["step_bytes"] = learner.replicas.stats.bytes_sent - sent
        run["A"] = {n: learner.modules[n].A.clone() for n in blocks}
        run["B"] = {n: learner.modules[n].B.detach().clone() for n in blocks}
        learner.consolidate()  # verifies the replicas: raises if they differ
        run["W"] = weights(learner)
        run.update(blocks=blocks, ranks={n: m.rank for n, m in learner.modules.items()},
                   losses=(before, student_losses(learner, world_size)), notes=learner.report.notes)
        runs[learning] = run

    # The last rank patched as if alone (before torch.distributed was initialised): every rank
    # refuses the step, before any call whose size would differ between them.
    import fastcl
    import fastcl.patcher

    laid_out = fastcl.patcher.group_layout
    if rank == world_size - 1:
        fastcl.patcher.group_layout = lambda group: None
    try:
        learner = block_learner()
    finally:
        fastcl.patcher.group_layout = laid_out
    learner.observe(torch.tensor([block_request(rank)[2]]))
    try:
        learner.step()
        runs["mislaid"] = None
    except fastcl.ReplicaMismatchError as error:
        runs["mislaid"] = (str(error), error.ranks)
    return runs
