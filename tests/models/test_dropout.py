"""``ConditionDropout`` draws subsets with the probabilities of its config (Composer §3.2)."""

from __future__ import annotations

import math

import pytest
import torch

from models import CONDITIONS, ConditionDropout, DropoutConfig

N = 200_000


def draw(config: DropoutConfig, available: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    if available is None:
        available = torch.ones(N, len(CONDITIONS), dtype=torch.bool)
    presence = ConditionDropout(config)(available, generator=torch.Generator().manual_seed(seed))
    assert presence.dtype == torch.bool and presence.shape == available.shape
    return presence


def assert_frequency(hits: torch.Tensor, p: float, what: str) -> None:
    """``hits`` (n,) bool has mean ``p`` within 5 standard errors (and 1e-3 for p near 0 or 1)."""
    n = hits.numel()
    observed = hits.float().mean().item()
    tolerance = max(5 * math.sqrt(p * (1 - p) / n), 1e-3)
    assert abs(observed - p) <= tolerance, (
        f"{what}: observed {observed:.5f}, expected {p:.5f} ± {tolerance:.5f}"
    )


def expected(config: DropoutConfig) -> dict[str, object]:
    """Closed-form frequencies: a row is all-dropped, all-kept, or dropped condition by condition."""
    p = torch.tensor(
        [config.per_condition.get(name, config.p_drop) for name in CONDITIONS], dtype=torch.float64
    )
    independent = 1 - config.p_drop_all - config.p_keep_all
    return {
        "none": config.p_drop_all + independent * p.prod().item(),
        "all": config.p_keep_all + independent * (1 - p).prod().item(),
        "keep": [config.p_keep_all + independent * (1 - q) for q in p.tolist()],
        "pair": lambda i, j: config.p_keep_all + independent * (1 - p[i].item()) * (1 - p[j].item()),
    }


@pytest.mark.parametrize(
    "config",
    [DropoutConfig(), DropoutConfig(p_drop=0.3, per_condition={"depth": 0.9})],
    ids=["default", "p_drop=0.3,depth=0.9"],
)
def test_frequencies_match_the_config(config):
    presence = draw(config)
    e = expected(config)
    assert_frequency(~presence.any(1), e["none"], "all dropped")
    assert_frequency(presence.all(1), e["all"], "all kept")
    for k, name in enumerate(CONDITIONS):
        assert_frequency(presence[:, k], e["keep"][k], f"{name} kept")
    # Pairs: the shared all/none rows correlate conditions, otherwise they are independent.
    for i, j in [(0, 1), (3, 6), (5, 7)]:
        assert_frequency(
            presence[:, i] & presence[:, j], e["pair"](i, j), f"{CONDITIONS[i]} and {CONDITIONS[j]}"
        )


def test_default_config_is_the_paper_recipe():
    config = DropoutConfig()
    p = config.drop_probabilities()
    assert p.shape == (len(CONDITIONS),)
    assert p[CONDITIONS.index("intensity")] == pytest.approx(0.7)
    assert all(p[k] == pytest.approx(0.5) for k, name in enumerate(CONDITIONS) if name != "intensity")
    other = DropoutConfig(p_drop=0.3, per_condition={"depth": 0.9}).drop_probabilities()
    assert other.tolist() == pytest.approx(
        [0.3, 0.3, 0.3, 0.3, 0.3, 0.9, 0.3, 0.3]
    )  # intensity back to p_drop
    # Concretely: intensity kept in 0.1 + 0.8 * 0.3 of the rows, the others in 0.1 + 0.8 * 0.5.
    presence = draw(config, seed=1)
    assert_frequency(presence[:, CONDITIONS.index("intensity")], 0.34, "intensity kept")
    assert_frequency(presence[:, CONDITIONS.index("caption")], 0.5, "caption kept")


def test_independent_regime_is_independent():
    config = DropoutConfig(p_drop_all=0.0, p_keep_all=0.0, p_drop=0.4, per_condition={"sketch": 0.8})
    presence = draw(config, seed=2)
    sketch, depth = presence[:, CONDITIONS.index("sketch")], presence[:, CONDITIONS.index("depth")]
    assert_frequency(sketch, 0.2, "sketch kept")
    assert_frequency(depth, 0.6, "depth kept")
    assert_frequency(sketch & depth, 0.2 * 0.6, "sketch and depth kept")
    assert_frequency(depth[sketch], 0.6, "depth kept given sketch kept")


def test_unavailable_conditions_are_never_present():
    g = torch.Generator().manual_seed(3)
    available = torch.rand(N, len(CONDITIONS), generator=g) > 0.4
    available[:, CONDITIONS.index("mask")] = False
    config = DropoutConfig()
    presence = draw(config, available, seed=4)
    assert not (presence & ~available).any()
    assert not presence[:, CONDITIONS.index("mask")].any()
    # Among the rows that have it, a condition is kept as often as ever.
    k = CONDITIONS.index("depth")
    assert_frequency(presence[available[:, k], k], expected(config)["keep"][k], "depth kept when available")


def test_same_seed_same_draw():
    available = torch.ones(64, len(CONDITIONS), dtype=torch.bool)
    dropout = ConditionDropout()
    a = dropout(available, generator=torch.Generator().manual_seed(5))
    b = dropout(available, generator=torch.Generator().manual_seed(5))
    c = dropout(available, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(p_drop=1.5), r"p_drop\n  Input should be less than or equal to 1"),
        (dict(p_drop=-0.1), r"p_drop\n  Input should be greater than or equal to 0"),
        (dict(p_drop_all=-0.1), r"p_drop_all\n  Input should be greater than or equal to 0"),
        (dict(p_keep_all=2.0), r"p_keep_all\n  Input should be less than or equal to 1"),
        (dict(p_drop_all=0.6, p_keep_all=0.6), r"p_drop_all \+ p_keep_all must be <= 1"),
        (dict(per_condition={"colour": 0.5}), "unknown condition 'colour'; known: caption, semantics"),
        (dict(per_condition={"depth": 1.2}), r"per_condition\['depth'\] must be in"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DropoutConfig(**kwargs)


@pytest.mark.parametrize(
    "available",
    [torch.ones(4, 8), torch.ones(4, 7, dtype=torch.bool), torch.ones(8, dtype=torch.bool)],
    ids=["float", "7-columns", "1d"],
)
def test_bad_available_raises(available):
    with pytest.raises(ValueError, match="available must be"):
        ConditionDropout()(available)
