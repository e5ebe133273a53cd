from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cawbench.seeding import derive_seed, epoch_generator, seed_everything


def draw() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_same_seed_same_numbers_different_seeds_differ():
    seed_everything(7)
    a = draw()
    seed_everything(7)
    assert draw() == a
    seed_everything(8)
    b = draw()
    assert b[0] != a[0] and b[1] != a[1] and b[2] != a[2]


def test_epoch_generators_are_stable_and_distinct():
    first = torch.randperm(50, generator=epoch_generator(3, 0)).tolist()
    assert torch.randperm(50, generator=epoch_generator(3, 0)).tolist() == first
    assert torch.randperm(50, generator=epoch_generator(3, 1)).tolist() != first
    assert torch.randperm(50, generator=epoch_generator(4, 0)).tolist() != first
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(1, "b")


def test_bad_seed_is_refused():
    with pytest.raises(ValueError, match="non-negative integer"):
        seed_everything(-3)
