"""Calibration data: offline code and math corpora (:mod:`.corpus`, split into calibration and held-out parts)
and calibration sets built from a mixture spec (:mod:`.mixture`)."""
