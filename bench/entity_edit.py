"""Prototype (not product code): learn each served fact by a closed-form, entity-keyed MLP edit
(ROME/MEMIT style) instead of an Adam step on B, and score the stream as diagnose_stream does.

For each served request: the response tokens the default recipe would learn (grounded, context
gain >= 0.5 nats) are the target; a residual vector delta at the student prompt's last entity
token, output of block L_last, is optimized so the student (no context) produces them; delta is
then written into the down_proj of blocks Ls as rank-1 updates W += r (C^-1 k)^T / (k^T C^-1 k)
(k: the down_proj input at that token, C: general text's down_proj input moment + ridge;
--keys mean also averages k over the entity's occurrences in the served document; --traffic
adds every served prompt's inputs to C before each edit). No Adam, no replay, no anchor, no gate.

    python bench/entity_edit.py --seed 4 --scale 0.5 --keys mean --traffic

Measured on development stream 4 and removed again (bench/RESULTS.md, "Closed-form entity edits").
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastcl import benchmark as B  # noqa: E402
from fastcl import evaluate as E  # noqa: E402
from fastcl.facts import ATTRIBUTES, fact_stream  # noqa: E402
from fastcl.models import load_default  # noqa: E402
from fastcl.recipe import Interaction, entity_span, in_context  # noqa: E402
from diagnose_stream import held_out_picks, per_fact_accuracy  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, default=4)
p.add_argument("--companies", type=int, default=20)
p.add_argument("--layers", default="3,4,5,6,7")
p.add_argument("--steps", type=int, default=25)
p.add_argument("--lr", type=float, default=0.5)
p.add_argument("--wd", type=float, default=0.01)
p.add_argument("--clamp", type=float, default=4.0)
p.add_argument("--ridge", type=float, default=0.1)
p.add_argument("--scale", type=float, default=1.0)  # fraction of the residual written
p.add_argument("--gain", type=float, default=0.5)
p.add_argument("--limit", type=int, default=0)
p.add_argument("--keys", default="student", choices=["student", "mean"])
p.add_argument("--traffic", action="store_true", help="C also holds every served prompt's down_proj inputs")
args = p.parse_args()

torch.set_num_threads(1)
torch.manual_seed(0)
model, tok = load_default()
blocks = model.model.layers
Ls = [int(x) for x in args.layers.split(",")]
L_last = Ls[-1]


def mlp_inputs(ids, layer):
    """down_proj inputs of block `layer` for a sequence of ids: (T, d_ff)."""
    got = {}
    h = blocks[layer].mlp.down_proj.register_forward_hook(lambda m, i, o: got.__setitem__("x", i[0].detach()))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    h.remove()
    return got["x"][0]


# General text's second moment of each edited layer's down_proj input (anchor + gate text: never
# the evaluation's general_text.txt).
text_ids = tok(E.load_text("anchor_text.txt") + "\n\n" + E.load_text("gate_text.txt"), add_special_tokens=False)["input_ids"]
Cinv, moment, count = {}, {}, {}
for layer in Ls:
    X = torch.cat([mlp_inputs(text_ids[i:i + 256], layer) for i in range(0, len(text_ids), 256)]).double()
    moment[layer], count[layer] = X.T @ X, len(X)


def refresh_inverse():
    for layer in Ls:
        C = moment[layer] / count[layer]
        C = C + args.ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
        Cinv[layer] = torch.linalg.inv(C)


refresh_inverse()


def residual_at(ids, pos, layer):
    got = {}
    h = blocks[layer].register_forward_hook(lambda m, i, o: got.__setitem__("h", o[0, pos].detach().clone()))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    h.remove()
    return got["h"]


stats = {"edited": 0, "skipped_no_target": 0, "skipped_no_entity": 0, "final_logprob": [], "delta_norm": [], "written_logprob": [], "immediate": []}


def edit(teacher, response, student, teacher_logprobs):
    item = Interaction(teacher=list(teacher), student=list(student), response=list(response), weight=1.0,
                       teacher_logprobs=teacher_logprobs)
    ids = item.student + item.response
    n = len(item.student)
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0, n - 1:-1].float().log_softmax(-1)
    student_lp = lp.gather(-1, torch.tensor(item.response)[:, None])[:, 0]
    target = in_context(item) & (teacher_logprobs.float() - student_lp >= args.gain)
    if not target.any():
        stats["skipped_no_target"] += 1
        return
    span = entity_span(item)
    if span is None:
        stats["skipped_no_entity"] += 1
        return
    pos = span[1] - 1
    if args.traffic:  # the served prompts' inputs join general text's moment before this edit is fitted
        for layer in Ls:
            X = mlp_inputs(item.teacher, layer).double()
            moment[layer] += X.T @ X
            count[layer] += len(X)
        refresh_inverse()
    h0 = residual_at(ids, pos, L_last)
    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=args.lr)
    rows = torch.arange(n - 1, len(ids) - 1)[target]
    tgt = torch.tensor(item.response)[target]

    def add(m, i, o):
        o = o.clone()
        o[0, pos] = o[0, pos] + delta
        return o

    hook = blocks[L_last].register_forward_hook(add)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    final = None
    for _ in range(args.steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        logprob = logits[rows].float().log_softmax(-1).gather(-1, tgt[:, None]).mean()
        final = float(logprob.detach())
        if final > -0.05:
            break
        loss = -logprob + args.wd * delta.pow(2).sum() / h0.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            limit = args.clamp * h0.norm()
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    hook.remove()
    z = h0 + args.scale * delta.detach()
    for k, layer in enumerate(Ls):
        now = residual_at(ids, pos, L_last)
        r = (z - now) / (len(Ls) - k)
        key = mlp_inputs(ids, layer)[pos].double()
        if args.keys == "mean":  # also the entity's occurrences in the served prompt (its document)
            name = item.student[span[0]:span[1]]
            t = item.teacher
            ends = [j + len(name) - 1 for j in range(len(t) - len(name) + 1) if t[j:j + len(name)] == name]
            if ends:
                xs = mlp_inputs(t, layer)
                key = torch.stack([key] + [xs[j].double() for j in ends]).mean(0)
        ck = Cinv[layer] @ key
        W = blocks[layer].mlp.down_proj.weight
        with torch.no_grad():
            W += (r.double()[:, None] * ck[None, :] / (key @ ck)).to(W.dtype)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        written = float(logits[rows].float().log_softmax(-1).gather(-1, tgt[:, None]).mean())
    stats["written_logprob"].append(round(written, 3))
    stats["edited"] += 1
    stats["final_logprob"].append(round(final, 3))
    stats["delta_norm"].append(round(float(delta.norm() / h0.norm()), 3))


class Editor:
    def learn(self, teacher, response, student, teacher_logprobs=None):
        edit(teacher, response, student, teacher_logprobs)
        fact = facts[len(stats["immediate"])]
        stats["immediate"].append(round(E.mean_answer_probability(E.multiple_choice_scores(model, tok, [(q, fact.options, fact.answer_index) for q in fact.eval_questions]), [(q, fact.options, fact.answer_index) for q in fact.eval_questions]), 3))

    def has_unmerged_updates(self):
        return False


facts = fact_stream(args.companies, seed=args.seed)
if args.limit:
    facts = facts[:args.limit]
mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
by_attribute = lambda xs: {a: round(mean([x for x, f in zip(xs, facts) if f.attribute == a]), 3) for a in ATTRIBUTES}  # noqa: E731
t0 = time.time()
picks, prob_before = held_out_picks(model, tok, facts)
floor = per_fact_accuracy(facts, picks)
controls = B.Controls.measure(model, tok, facts, args.seed)
ceiling = B.measure(model, tok, facts, in_context=True, general=False)["mc"]
items = E.fact_items(facts, False)
framed_floor = E.multiple_choice_accuracy(model, tok, items, frame=E.ANSWER_FRAME)
framed_ceiling = E.multiple_choice_accuracy(model, tok, E.fact_items(facts, True), frame=E.ANSWER_FRAME)
start = time.time()
served = B.serve(model, tok, Editor(), facts)
learn_seconds = time.time() - start
picks, prob_after = held_out_picks(model, tok, facts)
after = per_fact_accuracy(facts, picks)
swapped_after, binding_after = controls.after(model, tok)
framed_after = E.multiple_choice_accuracy(model, tok, items, frame=E.ANSWER_FRAME)
probes = E.load_probes()
states = [f.value.lower() in tok.decode(a).lower() for f, a in zip(facts, served.answers)]
q = max(1, len(facts) // 4)
result = {
    "args": vars(args), "floor": mean(floor), "ceiling": ceiling, "after": mean(after),
    "recovered": B.gap_recovered(mean(after), mean(floor), ceiling),
    "framed": [framed_floor, framed_ceiling, framed_after,
               B.gap_recovered(framed_after, framed_floor, framed_ceiling)],
    "answer_probability": [round(prob_before, 4), round(prob_after, 4)],
    "binding": [controls.binding_floor, controls.binding_ceiling, binding_after,
                B.gap_recovered(binding_after, controls.binding_floor, controls.binding_ceiling)],
    "swapped_company": [controls.swapped_before, swapped_after],
    "floor_by_attribute": by_attribute(floor), "after_by_attribute": by_attribute(after),
    "served_states_value_by_quarter": [round(mean(states[i:i + q]), 3) for i in range(0, len(states), q)],
    "perplexity_after": round(E.perplexity(model, tok, E.load_text("general_text.txt")), 3),
    "general_after": round(E.multiple_choice_accuracy(model, tok, probes), 3),
    "general_framed_after": round(E.multiple_choice_accuracy(model, tok, probes, frame=E.ANSWER_FRAME), 3),
    "learn_seconds": round(learn_seconds, 1), "seconds": round(time.time() - t0, 1),
    **{k: v for k, v in stats.items()},
}
print(json.dumps(result))
