"""Calibration methods: each is a registry entry behind one interface (``calibrate.registry``)."""

from repapq_deploy.calibrate.methods import METHODS
from repapq_deploy.calibrate.registry import all_methods, calibrate, calibrator

__all__ = ["METHODS", "all_methods", "calibrate", "calibrator"]
