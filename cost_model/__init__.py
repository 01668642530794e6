"""Cost model for the hybrid scheduler: fitted curves in pure Python (costs.py), measured by measure.py."""
