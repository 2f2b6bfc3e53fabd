"""``awqkit eval``: windows, per-window NLLs and their cache, paired statistics, the report."""
