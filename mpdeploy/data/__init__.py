"""Calibration and evaluation inputs: image folders, bundled photos and the digits demo set."""
