"""Calibration data: offline, deterministic code and math corpora (see :mod:`reamkit.calibration.corpus`)."""
