"""SIP (DeeperForward) and LCS (CAW-Conv) readouts on constructed per-layer scores."""

from __future__ import annotations

import math

import pytest
import torch

from cawbench.config import ReadoutConfig
from cawbench.readouts import ReadoutContext, get_readout, lcs_weights, sip_select


def test_sip_ties_go_to_the_smallest_end_then_the_smallest_start():
    labels = torch.tensor([0, 1])
    scores = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0]],  # layer 0: 1/2 right
            [[2.0, 0.0], [0.0, 3.0]],  # layer 1: 2/2
            [[0.5, 0.0], [0.0, 1.0]],  # layer 2: 2/2
        ]
    )
    # Perfect ranges: (0,1) [sums (3,0), (1,3)], (1,1), (0,2), (1,2), (2,2). Smallest end is 1; among
    # (0,1) and (1,1) the smallest start wins.
    assert sip_select(scores, labels, (1, -1)) == (0, 1, 1.0)
    # A strongly wrong layer 0 spoils (0,1) [sums (2,5), (5,3)]: the first perfect range is now (1,1).
    scores[0] = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    assert sip_select(scores, labels, (1, -1)) == (1, 1, 1.0)


def test_sip_matches_the_documented_rule_on_random_tied_scores():
    """Best accuracy; among equals the smallest end E, then the smallest start S (an independent statement
    of the strict scan), on small integer scores full of ties."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        scores = torch.randint(0, 3, (5, 12, 3), generator=gen).float()
        labels = torch.randint(0, 3, (12,), generator=gen)
        accs = {
            (s, e): (scores[s : e + 1].sum(0).argmax(-1) == labels).sum().item()
            for e in range(5)
            for s in range(e + 1)
        }
        best = max(accs.values())
        expected = min((e, s) for (s, e), a in accs.items() if a == best)
        start, end, acc = sip_select(scores, labels, (1, -1))
        assert (end, start) == expected and acc == best / 12


def test_sip_without_validation_data_keeps_the_initial_range():
    scores = torch.randn(5, 0, 3)
    assert sip_select(scores, torch.zeros(0, dtype=torch.long), (1, -1))[:2] == (1, 4)


def test_sip_readout_applies_the_chosen_range_to_new_scores():
    sip = get_readout("sip")
    labels = torch.tensor([0, 1])
    val = torch.tensor([[[0.0, 5.0], [5.0, 0.0]], [[2.0, 0.0], [0.0, 3.0]], [[0.5, 0.0], [0.0, 1.0]]])
    state = sip.fit(ReadoutContext(val, labels, [math.nan] * 3, ReadoutConfig(name="sip")))
    assert (state["start"], state["end"]) == (1, 1)
    test = torch.randn(3, 6, 2)
    torch.testing.assert_close(sip.combine(test, state), test[1])


def test_lcs_weights_sum_to_one_and_favour_the_lower_loss_layer():
    losses = torch.tensor([2.0, 0.5, 1.0])
    w = lcs_weights(losses)
    assert w.sum().item() == pytest.approx(1.0)
    assert w.argmax().item() == 1 and w[1] > w[2] > w[0]
    # softmax(-L) with temperature 1: w1 / w2 = e^(1.0 - 0.5)
    assert (w[1] / w[2]).item() == pytest.approx(math.exp(0.5), rel=1e-6)


def test_lcs_fit_uses_the_training_ce_by_default_and_the_validation_ce_as_a_variant():
    lcs = get_readout("lcs")
    labels = torch.tensor([0, 1, 2, 0])
    val = torch.stack([torch.eye(3)[labels] * 4.0, torch.zeros(4, 3)])  # layer 0 confident and right
    train_ce = [1.5, 0.2]  # but layer 1 had the lower training loss
    state = lcs.fit(ReadoutContext(val, labels, train_ce, ReadoutConfig(name="lcs")))
    assert state["signal"] == "train" and sum(state["weights"]) == pytest.approx(1.0)
    assert state["weights"] == pytest.approx(torch.softmax(-torch.tensor(train_ce), 0).tolist())
    state_val = lcs.fit(ReadoutContext(val, labels, train_ce, ReadoutConfig(name="lcs", lcs_signal="val")))
    assert state_val["signal"] == "val" and state_val["weights"][0] > state_val["weights"][1]
    val_ce = [torch.nn.functional.cross_entropy(s, labels).item() for s in val]
    assert state_val["weights"] == pytest.approx(torch.softmax(-torch.tensor(val_ce), 0).tolist(), rel=1e-5)
    combined = lcs.combine(val, state)
    torch.testing.assert_close(combined, state["weights"][0] * val[0] + state["weights"][1] * val[1])
