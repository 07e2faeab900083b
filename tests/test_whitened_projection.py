"""projection="whitened": A fitted to the first request of each projection epoch, in the
directions where its inputs stand out from general text (fastcl.projection.fit_to_inputs)."""

import pytest
import torch

import fastcl
from fastcl.projection import fit_to_inputs, make_projection
from fastcl.protection import Whitener
from helpers import random_ids, record_fits, tiny_model
from test_protection import CharTokenizer


def spd_moment(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(2, -3, d, dtype=torch.float64)
    return (q * spectrum) @ q.t()


@pytest.mark.parametrize("k", [40, 12])
def test_whitener_is_the_ridged_inverse_square_root_on_its_basis_and_everywhere_when_full(k):
    d, ridge = 40, 0.1
    C = spd_moment(d)
    w = Whitener.from_moment(C * 7, rows=7, ridge=ridge, k=k)
    level = float(torch.trace(C)) / d
    values, vectors = torch.linalg.eigh(C + ridge * level * torch.eye(d, dtype=C.dtype))
    exact = ((vectors * values.rsqrt()) @ vectors.t()).float()
    assert w.basis.shape == (d, k)
    assert abs(w.level - level**0.5) < 1e-6 * w.level
    # Exact on the kept eigenvectors; with k = d exact on every vector.
    torch.testing.assert_close(w.apply(w.basis.t()), (exact @ w.basis).t(), rtol=1e-4, atol=1e-5)
    if k == d:
        torch.testing.assert_close(w.apply(torch.eye(d)), exact, rtol=1e-4, atol=1e-5)


def test_fitted_rows_see_general_text_like_a_random_row_avoid_protection_and_carry_the_inputs():
    d, rank, n = 40, 6, 4
    C = spd_moment(d, seed=1)
    w = Whitener.from_moment(C, rows=1, ridge=0.1, k=d)
    avoid, _ = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(2)))
    drawn = make_projection(0, 1, 0, rank, d, torch.float32, "cpu", avoid=avoid)
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(3))
    # Without protection each fitted row has a random row's general-text energy tr(C)/d, in the
    # (ridged) moment the whitener inverts.
    plain = fit_to_inputs(drawn, X, w)[:n].double()
    ridged = C + 0.1 * w.level**2 * torch.eye(d, dtype=C.dtype)
    general = torch.einsum("id,de,ie->i", plain, ridged, plain)
    torch.testing.assert_close(general, torch.full((n,), w.level**2, dtype=general.dtype), rtol=1e-4, atol=0)
    A = fit_to_inputs(drawn, X, w, avoid)
    fitted, rest = A[:n].double(), A[n:].double()
    assert (A @ avoid).abs().max() < 1e-5
    assert (rest @ fitted.t()).abs().max() < 1e-4  # the random rows left make room for the fitted ones
    # The inputs reach the sketch far more strongly than through the seed's draw.
    assert (X @ A.t()).norm() > 3 * (X @ drawn.t()).norm()


def whitened(**kw):
    model = tiny_model("llama")
    options = dict(rank=4, lr=1e-2, tokenizer=CharTokenizer(), projection="whitened", gate_tolerance=None,
                   anchor_weight=0.0, replay=0, replay_per_step=0, grounded=False)  # random ids: no shared tokens
    options.update(kw)
    return model, fastcl.patch(model, **options)


def request(seed):
    ids = random_ids(1, 20, seed=seed)[0].tolist()
    return ids[:12], ids[12:], ids[8:12]  # teacher (with "context"), response, student


def test_learn_fits_a_once_an_epoch_without_changing_the_served_function_and_learns():
    model, learner = whitened(consolidate_every=0, gain_threshold=-float("inf"))
    teacher, response, student = request(0)
    ids = torch.tensor([student + response])

    def response_loss():
        with torch.no_grad():
            logprobs = model(ids).logits[0, len(student) - 1:-1].log_softmax(-1)
        return float(-logprobs.gather(1, torch.tensor(response)[:, None]).mean())

    drawn = {name: m.A.clone() for name, m in learner.modules.items()}
    with torch.no_grad():
        before_logits = model(ids).logits
    before = response_loss()
    learner.learn(teacher, response, student)
    assert all(m.fitted and not torch.equal(m.A, drawn[name]) for name, m in learner.modules.items())
    assert all(m.fit_positions is None for m in learner.modules.values())
    fitted = {name: m.A.clone() for name, m in learner.modules.items()}
    for _ in range(5):  # B is live now: A stays as fitted
        learner.learn(teacher, response, student)
    assert all(torch.equal(m.A, fitted[name]) for name, m in learner.modules.items())
    assert response_loss() < before - 0.5
    learner.consolidate()  # a new epoch: the seed's draw until the next learn() fits again
    assert not any(m.fitted for m in learner.modules.values())
    # Fitting alone (a request with nothing to learn) changes A, not what the model serves.
    idle_model, idle = whitened(gain_threshold=1e9)
    idle.learn(teacher, response, student)
    assert all(m.fitted and m.b_is_zero for m in idle.modules.values())
    with torch.no_grad():
        torch.testing.assert_close(idle_model(ids).logits, before_logits, rtol=0, atol=0)


def test_fitted_projection_survives_save_load_and_rollback(tmp_path):
    model, learner = whitened(consolidate_every=0, gain_threshold=-float("inf"))
    teacher, response, student = request(1)
    learner.learn(teacher, response, student)
    path = tmp_path / "state.safetensors"
    learner.save(path)
    ids = torch.tensor([student + response])
    with torch.no_grad():
        served = model(ids).logits
    other_model, other = whitened()
    other.load(path)
    with torch.no_grad():
        torch.testing.assert_close(other_model(ids).logits, served, rtol=0, atol=0)
    assert all(m.fitted for m in other.modules.values())

    fitted = {name: m.A.clone() for name, m in learner.modules.items()}
    learner.consolidate()
    learner.rollback()
    for name, m in learner.modules.items():
        assert m.fitted and torch.equal(m.A, fitted[name])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, served, rtol=0, atol=0)


def test_whitened_projection_is_refused_without_a_tokenizer_and_with_replicas(monkeypatch):
    with pytest.raises(fastcl.PatchError, match="projection need the tokenizer"):
        fastcl.patch(tiny_model("llama"), projection="whitened")
    with pytest.raises(ValueError, match="projection must be one of"):
        fastcl.patch(tiny_model("llama"), projection="fitted")
    # Laid out in blocks for a group of two, then learning alone; or an asynchronous group.
    from fastcl import patcher

    with monkeypatch.context() as patched_in_a_group:
        patched_in_a_group.setattr(patcher, "group_layout", lambda group: (0, 2))
        _, learner = whitened()
    teacher, response, student = request(2)
    with pytest.raises(fastcl.FastclError, match="patched in a group of replicas and now learns alone"):
        learner.learn(teacher, response, student)
    assert not any(m.fitted for m in learner.modules.values())
    _, learner = whitened(sync_every=2)
    monkeypatch.setattr(type(learner.replicas), "group", property(lambda self: object()))
    with pytest.raises(fastcl.FastclError, match="with asynchronous replicas"):
        learner.learn(teacher, response, student)
    assert not any(m.fitted for m in learner.modules.values())


def test_served_metric_plays_down_what_earlier_requests_share_and_keeps_what_is_new():
    d, rank, n = 40, 6, 4
    w = Whitener.from_moment(spd_moment(d, seed=1), rows=1, ridge=0.1, k=d)
    drawn = make_projection(0, 1, 0, rank, d, torch.float32, "cpu")
    specific = torch.randn(n, d, generator=torch.Generator().manual_seed(3))
    shared = torch.randn(d, generator=torch.Generator().manual_seed(5))
    X = specific + 3 * shared  # this request: its own part plus what every request has
    # The identity metric is the plain whitened fit.
    torch.testing.assert_close(fit_to_inputs(drawn, X, w, served=torch.eye(d, dtype=torch.float64)),
                               fit_to_inputs(drawn, X, w), rtol=0, atol=1e-5)
    earlier = w.apply(shared.expand(10, d)).double()
    metric = torch.eye(d, dtype=torch.float64) + 10 * earlier.t() @ earlier / 10
    plain, served = fit_to_inputs(drawn, X, w)[:n], fit_to_inputs(drawn, X, w, served=metric)[:n]
    assert (served @ shared).abs().sum() < 0.1 * (plain @ shared).abs().sum()
    assert (served @ specific.t()).norm() > 0.8 * (plain @ specific.t()).norm()
    # Rows keep a random row's general-text energy.
    ridged = spd_moment(d, seed=1) + 0.1 * w.level**2 * torch.eye(d, dtype=torch.float64)
    energy = torch.einsum("id,de,ie->i", served.double(), ridged, served.double())
    torch.testing.assert_close(energy, torch.full((n,), w.level**2, dtype=energy.dtype), rtol=1e-4, atol=0)


def test_projection_served_counts_each_fitted_request_and_changes_the_next_fit():
    teacher, response, student = request(3)
    later = request(4)
    fits = {}
    for weight in (0.0, 1.0):
        _, learner = whitened(projection_served=weight)
        learner.learn(teacher, response, student)
        learner.learn(*later)
        fits[weight] = {name: m.A.clone() for name, m in learner.modules.items()}
        counted = {m.served_requests for m in learner.modules.values()}
        assert counted == ({2} if weight else {0})
    # The first request is fitted alike (nothing served before it); the second is not.
    assert all(not torch.allclose(fits[1.0][name], fits[0.0][name], atol=1e-4) for name in fits[0.0])


def test_projection_served_needs_the_whitened_projection():
    with pytest.raises(ValueError, match="projection_served weighs earlier requests"):
        fastcl.LearnerConfig(projection_served=1.0, layer_options=None)
    with pytest.raises(ValueError, match="projection_served must be >= 0"):
        fastcl.LearnerConfig(projection="whitened", projection_served=-1.0)


def test_learn_at_the_entity_fits_a_to_the_entity_positions(monkeypatch):
    """learn_at="entity" with the whitened projection: A is fitted to the inputs dB learns from,
    the student prompt's entity, not to the positions that predict the response."""
    recorded = record_fits(monkeypatch)
    head, tail = [1, 2], [5]
    teacher, student = head + [10, 40, 41, 11, 12, 13] + [3, 40, 41, 4] + tail, head + [3, 40, 41, 4] + tail
    for learn_at, expected in (("entity", [3, 4]), ("entity_last", [4]), ("all", [6, 7, 8])):
        recorded.clear()
        _, learner = whitened(learn_at=learn_at, gain_threshold=-float("inf"))
        learner.learn(teacher, [11, 12, 13], student)
        assert len(recorded) == len(learner.modules) and all(p == expected for _, p in recorded), learn_at
