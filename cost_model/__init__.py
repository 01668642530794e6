"""The hybrid scheduler's cost model: fitted curves in pure Python, no torch, nothing from hybrid/ (costs.py).
hybrid/offload/calibration.py measures them on a machine."""
