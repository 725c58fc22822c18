"""What keeps an end-to-end run short without changing the code paths it takes."""

from __future__ import annotations

#: The first 40 mini-batches of each local epoch.
MAX_STEPS = "train.max_steps=40"
#: The server scores 2,000 test samples (a seeded draw) instead of the whole test set.
TEST_SAMPLES = "evaluation.test_samples=2000"
#: Both, as ``--set`` overrides.
SHORT = (MAX_STEPS, TEST_SAMPLES)
