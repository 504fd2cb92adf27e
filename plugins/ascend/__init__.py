"""ascend probe."""
