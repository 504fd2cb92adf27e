"""nvml probe."""
