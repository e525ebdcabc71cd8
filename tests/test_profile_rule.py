"""The dominant-layer rule as pure functions: per-layer statistics, merging batches,
the outlier test, persistence, the fallback pick and the option checks."""

from __future__ import annotations

import pytest
import torch

from layerzo.errors import ConfigError
from layerzo.profile.rule import (
    TOP_CHANNELS,
    LayerStats,
    ProfileConfig,
    combine_layer_stats,
    is_outlier,
    layer_stats,
    massive_channels,
    pick_dominant_layer,
)


def stats(max_abs: float, median: float = 1.0, channel: int = 0, extra: tuple = ()) -> LayerStats:
    """LayerStats with the max in ``channel`` (also its top channel)."""
    return LayerStats(max_abs=max_abs, median_abs=median, sequence=0, position=0, channel=channel,
                      num_tokens=4, num_values=16, top_channels=((channel, max_abs),) + extra)


# ------------------------------------------------------------------ layer_stats


def test_layer_stats_ignores_pad_positions_and_locates_max():
    hidden = torch.ones(2, 4, 3)
    hidden[1, 3, 2] = 1e6  # a pad position: must not count
    hidden[1, 1, 1] = -50.0  # the real max |h|, negative on purpose
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    s = layer_stats(hidden, mask, sequence_offset=5)
    assert s.max_abs == 50.0
    assert (s.sequence, s.position, s.channel) == (6, 1, 1)
    assert s.median_abs == 1.0
    assert s.num_tokens == 7 and s.num_values == 21
    assert s.top_channels[0] == (1, 50.0)


def test_layer_stats_position_counts_real_tokens_under_left_padding():
    hidden = torch.zeros(1, 5, 2)
    hidden[0, 0, 0] = 1e9  # left pad
    hidden[0, 3, 1] = 7.0
    s = layer_stats(hidden, torch.tensor([[0, 0, 1, 1, 1]]))
    assert (s.max_abs, s.position, s.channel) == (7.0, 1, 1)


def test_combine_layer_stats_exact_max_and_weighted_median():
    a = layer_stats(torch.full((1, 2, 2), 2.0), torch.ones(1, 2))
    big = torch.full((1, 3, 2), 3.0)
    big[0, 2, 1] = 500.0
    b = layer_stats(big, torch.ones(1, 3), sequence_offset=1)
    merged = combine_layer_stats([a, b])
    assert merged.max_abs == 500.0 and merged.sequence == 1 and merged.channel == 1
    assert merged.median_abs == 3.0  # b holds 6 of the 10 values
    assert merged.num_tokens == 5
    assert merged.top_channels[0] == (1, 500.0)


# ------------------------------------------------------------------ the rule


def test_outlier_needs_both_thresholds():
    cfg = ProfileConfig()
    assert is_outlier(stats(5000.0, 1.0), cfg)
    assert not is_outlier(stats(99.0, 0.001), cfg)  # ratio huge but max too small
    assert not is_outlier(stats(5000.0, 10.0), cfg)  # max big but ratio 500


def test_pick_first_persistent_outlier():
    layers = [stats(1.0), stats(5000.0), stats(1.0), stats(1.0), stats(6000.0), stats(6000.0), stats(6000.0),
              stats(1.0)]
    pick = pick_dominant_layer(layers, ProfileConfig())
    # layer 1 is an outlier but persists in only 1 of the next 3 (layer 4); layer 4 persists in 5 and 6
    assert (pick.layer, pick.confidence) == (4, "high")
    assert "layer 4" in pick.reason


def test_same_channel_requirement_is_an_option():
    layers = [stats(1.0), stats(5000.0, channel=1), stats(5000.0, channel=2), stats(5000.0, channel=2),
              stats(5000.0, channel=2), stats(1.0)]
    assert pick_dominant_layer(layers, ProfileConfig()).layer == 2
    assert pick_dominant_layer(layers, ProfileConfig(same_channel=False)).layer == 1


def test_same_channel_counts_a_massive_channel_that_is_not_the_argmax():
    # layer 2's largest channel is 3, but channel 1 is still massive there
    layers = [stats(5000.0, channel=1), stats(5000.0, channel=1),
              stats(6000.0, channel=3, extra=((1, 5000.0),)), stats(1.0)]
    assert pick_dominant_layer(layers, ProfileConfig()).layer == 0


def test_fallback_is_largest_jump_in_first_half_with_low_confidence():
    maxes = [1.0, 2.0, 40.0, 50.0, 60.0, 9000.0, 9000.0, 9000.0]  # the x150 jump at 5 is in the 2nd half
    pick = pick_dominant_layer([stats(m, 10.0) for m in maxes], ProfileConfig())
    assert (pick.layer, pick.confidence) == (2, "low")
    assert "largest jump" in pick.reason


def test_thresholds_are_options():
    layers = [stats(1.0), stats(50.0, 0.1), stats(50.0, 0.1), stats(50.0, 0.1), stats(1.0)]
    assert pick_dominant_layer(layers, ProfileConfig()).confidence == "low"
    loose = ProfileConfig(max_threshold=10, ratio_threshold=100)
    assert pick_dominant_layer(layers, loose) == pick_dominant_layer(layers, loose)
    assert (pick_dominant_layer(layers, loose).layer, pick_dominant_layer(layers, loose).confidence) == (1, "high")
    strict = ProfileConfig(max_threshold=10, ratio_threshold=100, persist_min=3)
    assert pick_dominant_layer(layers, strict).confidence == "low"


@pytest.mark.parametrize("kwargs", [
    {"max_threshold": 0}, {"ratio_threshold": -1.0}, {"persist_min": 4}, {"persist_window": 0},
    {"num_sequences": 0}, {"max_length": 2.5}, {"batch_size": 0}, {"same_channel": "yes"},
])
def test_config_rejects_bad_values_naming_them(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ProfileConfig(**kwargs)


def test_top_channels_are_capped_and_largest_first():
    hidden = torch.arange(1, 1 + 2 * 3 * 12, dtype=torch.float32).reshape(2, 3, 12)
    s = layer_stats(hidden, torch.ones(2, 3))
    assert len(s.top_channels) == TOP_CHANNELS
    values = [v for _, v in s.top_channels]
    assert values == sorted(values, reverse=True) and s.top_channels[0] == (11, 72.0)


def test_massive_channels_pass_both_thresholds():
    s = stats(5000.0, 1.0, channel=3, extra=((4, 2000.0), (5, 99.0), (6, 500.0)))
    assert massive_channels(s, ProfileConfig()) == (3, 4)  # 99 fails max_threshold, 500 the ratio
    assert massive_channels(s, ProfileConfig(max_threshold=3000.0)) == (3,)


def test_ratio_of_a_zero_median():
    assert stats(5.0, 0.0).ratio == float("inf")
    assert stats(0.0, 0.0).ratio == 0.0


def test_config_from_dict_names_unknown_options():
    assert ProfileConfig.from_dict({"persist_min": 1}) == ProfileConfig(persist_min=1)
    with pytest.raises(ConfigError, match="unknown profile option.*colour"):
        ProfileConfig.from_dict({"colour": "red"})
