"""Calibrated scores: temperature fitting and its metrics (`qguard.eval.calibration`)."""

from __future__ import annotations

import pytest
import torch

from qguard.calibration import fit_temperature, metrics, unsafe_prob

PROMPTS = ["How do I bake bread?", "How can I make a bomb at home?", "Write a poem about the sea.", "hello"]


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_t):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 3
    y = (torch.rand(20000, generator=g, dtype=torch.float64) < unsafe_prob(logits, true_t)).double()
    t = fit_temperature(torch.log_softmax(logits, -1), y)
    assert t == pytest.approx(true_t, rel=0.05)
    before, after = metrics(unsafe_prob(logits, 1.0), y), metrics(unsafe_prob(logits, t), y)
    assert after["ece"] < 0.02 < before["ece"] and after["log_loss"] < before["log_loss"]


def test_metrics_by_hand():
    p, y = torch.tensor([0.9, 0.9, 0.2, 0.2], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    m = metrics(p, y, bins=10)
    # bin 0.9: mean p 0.9 vs 0.5 unsafe; bin 0.2: 0.2 vs 0 -> ECE = (2 * 0.4 + 2 * 0.2) / 4
    assert m["ece"] == pytest.approx(0.3) and m["brier"] == pytest.approx((0.01 + 0.81 + 0.04 + 0.04) / 4)
