"""Accuracy metrics of the report."""

from __future__ import annotations

import numpy as np
import pytest

from repapq_deploy.verify.report import paired_drop


def test_paired_drop_counts_images_and_its_standard_error():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    onehot = np.eye(4)
    fp32 = onehot[[0, 1, 2, 3, 0, 1, 1, 1]]  # right on the first six
    engine = onehot[[0, 1, 2, 0, 0, 0, 2, 1]]  # loses images 3 and 5, gains image 6
    d = paired_drop(fp32, engine, labels)
    assert (d["lost"], d["gained"]) == (2, 1)
    assert d["drop_pp"] == pytest.approx(12.5)
    assert d["drop_se_pp"] == pytest.approx(np.sqrt(3 - 1 / 8) / 8 * 100)
    same = paired_drop(fp32, fp32, labels)
    assert same == {"lost": 0, "gained": 0, "drop_pp": 0.0, "drop_se_pp": 0.0}
