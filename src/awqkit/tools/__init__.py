"""``awqkit diff`` and ``awqkit info``: reading checkpoints, writing nothing."""
