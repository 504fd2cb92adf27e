"""mock probe."""
