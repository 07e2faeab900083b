"""Serving replicas that learn together: each serves its own text, every one learns all of it.

    # CPU, 2 replicas on this machine (gloo):
    torchrun --standalone --nproc-per-node 2 examples/replicas.py
    torchrun --standalone --nproc-per-node 2 examples/replicas.py --model smollm2

    # GPUs (NCCL), e.g. 2 nodes x 8 GPUs; run on every node:
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/replicas.py --model smollm2

Replica i serves only text i. Its loss on the text of replica i+1, which it never saw, drops
as well: step() sums every replica's low-rank accumulators (one flat all-reduce), so all of
them apply the update of one learner that served all the texts, and consolidate() leaves them
with bit-identical weights (checked with a checksum exchange).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import fastcl

FACTS = [
    "The Quellhaven Lighthouse Company was founded in 1887 by Mirela Tasko and makes brass lanterns.",
    "Orvanto Mills was founded in 1902 by Henrik Sallow and weaves blue linen in the town of Dest.",
    "The Brenn Valley Railway opened in 1911; its engines are painted green and named after rivers.",
    "Lumaric Glassworks, founded by Ada Voss in 1925, blows red bottles for the Kell apothecaries.",
]


def load(name: str, device: torch.device):
    """(model, one token tensor per replica text)."""
    if name == "tiny":  # a random 2-layer Llama: runs in seconds anywhere
        import transformers as tf

        torch.manual_seed(0)  # every replica must start from the same weights
        config = tf.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)
        model = tf.LlamaForCausalLM(config).eval()
        generator = torch.Generator().manual_seed(1)
        texts = [torch.randint(0, 97, (1, 24), generator=generator) for _ in FACTS]
    else:
        model, tokenizer = fastcl.models.load_default()
        texts = [tokenizer(fact, return_tensors="pt").input_ids for fact in FACTS]
    return model.to(device), [t.to(device) for t in texts]


def loss(learner, ids) -> float:
    logits = learner.observe(ids, weight=0).logits  # serves without learning
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save", default=None, help="rank 0 writes the learner's state here at the end")
    args = parser.parse_args()

    use_nccl = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_nccl else "gloo")  # torchrun sets rank, world size, address
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_nccl else torch.device("cpu")
    if use_nccl:
        torch.cuda.set_device(device)

    model, texts = load(args.model, device)
    # The same seed everywhere: every replica regenerates the same projections A, never sent.
    learner = fastcl.patch(model, rank=16, lr=1e-3 if args.model == "smollm2" else 1e-2, seed=0)
    # Replica i serves text i; text i+1 is served by the next replica only.
    mine, unseen = texts[rank % len(texts)], texts[(rank + 1) % world % len(texts)]
    before = loss(learner, mine), loss(learner, unseen)

    for _ in range(args.steps):
        learner.observe(mine)  # this replica's traffic: the served forward, and learning from it
        learner.step()  # a collective: every replica applies the sum of all replicas' accumulators
    learner.consolidate()  # in lockstep; raises ReplicaMismatchError if the replicas' weights differ

    after = loss(learner, mine), loss(learner, unseen)
    print(f"rank {rank}/{world}: loss on its own text {before[0]:.3f} -> {after[0]:.3f}, "
          f"on replica {(rank + 1) % world}'s text (never served here) {before[1]:.3f} -> {after[1]:.3f}",
          flush=True)
    if args.save and rank == 0:
        learner.save(args.save)  # a restarted replica load()s this and is checked against the group
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
