"""The sampler: what each filter may and may not pick, and seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.engine import Engine
from gptjax.sampling import MAX_TEMPERATURE, SamplingParams, row_keys, sample

VOCAB = 1000
ROWS = 64


@jax.jit  # compiled once per shape, as the engine runs it: op by op, the filter tests took 40 s each
def _draw(logits, temperature, top_k, top_p, seed, position):
    n = logits.shape[0]

    def full(value, dtype):
        return jnp.full((n,), value, dtype)

    keys = row_keys(jnp.arange(n, dtype=jnp.uint32) + seed, full(position, jnp.int32))
    return sample(logits, full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32), keys)


def draw(logits, temperature=1.0, top_k=0, top_p=1.0, seed=0, position=0):
    return np.asarray(_draw(jnp.asarray(logits), temperature, top_k, top_p, np.uint32(seed), position))


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=(ROWS, VOCAB)).astype(np.float32) * 3


def test_top_k_never_picks_outside_the_k_largest(logits):
    for k in (1, 5, 50):
        picks = np.concatenate([draw(logits, top_k=k, seed=s) for s in range(20)])
        allowed = np.argsort(-logits, axis=-1)[:, :k]
        assert all(p in allowed[i % ROWS] for i, p in enumerate(picks))
    assert (draw(logits, top_k=1) == logits.argmax(-1)).all()


def test_top_p_never_picks_outside_the_nucleus(logits):
    for p in (0.1, 0.5, 0.9):
        picks = np.stack([draw(logits, top_p=p, seed=s) for s in range(20)], axis=1)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1)
        for row in range(ROWS):
            sorted_p = probs[row, order[row]]
            size = int(np.searchsorted(np.cumsum(sorted_p), p) + 1)  # smallest prefix with mass >= p
            nucleus = set(order[row, :size].tolist())
            assert set(picks[row].tolist()) <= nucleus
    # and a nucleus wider than one token is actually sampled from
    assert len(set(draw(logits[:1].repeat(ROWS, 0), top_p=0.99).tolist())) > 1


def test_top_k_then_top_p(logits):
    picks = np.concatenate([draw(logits, top_k=10, top_p=0.5, seed=s) for s in range(10)])
    top10 = np.argsort(-logits, axis=-1)[:, :10]
    assert all(p in top10[i % ROWS] for i, p in enumerate(picks))


def test_seeds_reproduce_and_differ(logits):
    a, b, c = draw(logits, seed=7), draw(logits, seed=7), draw(logits, seed=8)
    assert (a == b).all()
    assert (a != c).any()
    assert (draw(logits, seed=7, position=3) != a).any()  # a new position draws anew


def test_tiny_temperature_is_greedy(logits):
    assert (draw(logits, temperature=1e-5) == logits.argmax(-1)).all()
    assert (draw(logits, temperature=0.0) == logits.argmax(-1)).all()
    assert (draw(logits, temperature=1.5e-38) == logits.argmax(-1)).all()  # logits / T would overflow


def test_a_huge_temperature_keeps_the_filters(logits):
    """float32's largest temperature (every API takes it) made logits / temperature underflow to ties at 0, and
    top-k 5 or a top-p of 1e-12 then kept every token: a uniform draw over the vocabulary. Taken as
    MAX_TEMPERATURE on the host, it draws from the filtered tokens, and unfiltered it draws as before."""
    assert SamplingParams(temperature=3.4e38).temperature == SamplingParams(temperature=1e300).temperature
    hot = SamplingParams(temperature=3.4e38).temperature
    assert hot == MAX_TEMPERATURE and SamplingParams(temperature=0.5).temperature == 0.5
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    picks = np.stack([draw(logits, temperature=hot, top_k=5, seed=s) for s in range(8)], axis=1)
    assert all(set(picks[i]) <= set(top5[i]) for i in range(ROWS)) and len(np.unique(picks)) > 5
    assert (draw(logits, temperature=hot, top_p=1e-12) == logits.argmax(-1)).all()  # a nucleus of one token
    nucleus = np.argsort(-logits, axis=-1)[:, :500]  # at this temperature every kept token weighs the same
    assert all(p in nucleus[i] for i, p in enumerate(draw(logits, temperature=hot, top_p=0.5)))
    assert (draw(logits, temperature=hot) == draw(logits, temperature=3.4e38)).all()


def test_rows_mix_greedy_and_sampling(logits):
    n = logits.shape[0]
    temps = jnp.where(jnp.arange(n) % 2 == 0, 0.0, 1.0)
    keys = row_keys(jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32))
    out = np.asarray(sample(jnp.asarray(logits), temps, jnp.zeros((n,), jnp.int32), jnp.ones((n,)), keys))
    assert (out[::2] == logits.argmax(-1)[::2]).all()
    assert (out[1::2] != logits.argmax(-1)[1::2]).any()


def test_a_rows_draw_does_not_depend_on_the_others_filters(logits):
    """The vocabulary is sorted only when some drawing row asks for top-k or top-p; a row that asks for
    neither draws the same token whether or not another row of its batch filters."""
    n = logits.shape[0]
    keys = row_keys(jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32))

    def run(top_k, top_p):
        return np.asarray(sample(jnp.asarray(logits), jnp.ones((n,)), jnp.asarray(top_k, jnp.int32),
                                 jnp.asarray(top_p, jnp.float32), keys))

    plain = run(np.zeros(n), np.ones(n))
    top_p = np.where(np.arange(n) == 0, 0.05, 1.0)
    top_k = np.where(np.arange(n) == 1, 3, 0)
    mixed = run(top_k, top_p)
    assert (mixed[2:] == plain[2:]).all()
    assert mixed[0] == logits[0].argmax() and mixed[1] in np.argsort(-logits[1])[:3]


def test_top_k_of_one_is_greedy_at_any_temperature(logits):
    for temperature in (0.5, 1.0, 100.0):
        assert (draw(logits, temperature=temperature, top_k=1, seed=3) == logits.argmax(-1)).all()


def test_engine_seeds_are_per_request():
    engine = Engine.from_preset("gpt2-tiny")
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, stop_token_ids=[])
    a = engine.generate(["Hello there"], seed=1, **kw)[0].output_ids
    assert engine.generate(["Hello there"], seed=1, **kw)[0].output_ids == a
    assert engine.generate(["Hello there"], seed=2, **kw)[0].output_ids != a
    # a request's tokens do not depend on what shares its batch
    batch = engine.generate(["Hello there", "Something else entirely"], seed=[1, 5], **kw)
    assert batch[0].output_ids == a
    assert engine.generate(["Hello there"], seed=1, top_k=10**10, **kw)[0].output_ids == a  # past the vocabulary: off


def test_a_huge_temperature_with_a_tiny_nucleus_is_greedy_in_the_engine():
    """The nucleus of a flat distribution, 1e-9 of its mass, is its most likely token: the greedy text, whatever
    the temperature past float32's range or at its largest (which drew from the whole vocabulary)."""
    engine = Engine.from_preset("gpt2-tiny")
    kw = dict(max_new_tokens=6, stop_token_ids=[])
    greedy = engine.generate([464, 2068, 7586], greedy=True, **kw)[0].output_ids
    for temperature in (3.4e38, 1e300):
        out = engine.generate([464, 2068, 7586], temperature=temperature, top_p=1e-9, seed=3, **kw)[0]
        assert out.output_ids == greedy, temperature


@pytest.mark.parametrize("kw, words", [(dict(temperature="0.5"), "temperature must be a number, got '0.5'"),
                                       (dict(temperature=True), "temperature must be a number, got True"),
                                       (dict(top_p=[0.5]), "top_p must be a number, got [0.5]"),
                                       (dict(top_p=True, greedy=True), "top_p must be a number")])
def test_generate_names_a_sampling_argument_that_is_not_a_number(kw, words):
    """A string was parsed and a bool read as 1.0 (sampling where the caller meant something else); a list was
    float()'s TypeError, naming no argument."""
    engine = Engine.from_preset("gpt2-tiny")
    with pytest.raises(ValueError) as info:
        engine.generate([464], max_new_tokens=1, **kw)
    assert words in str(info.value)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan"))])
def test_bad_sampling_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
