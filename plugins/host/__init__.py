"""host probe."""
