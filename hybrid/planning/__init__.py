"""Per-layer planning: the makespan scheduler, online lane feedback, prefetch and copy-ahead policies."""
