"""Calibration methods: each is a registry entry behind one interface (``calibrate()``)."""

from repapq_deploy.calibrate.methods import METHODS, calibrate

__all__ = ["METHODS", "calibrate"]
