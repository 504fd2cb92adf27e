"""capmon collector: authenticated ingest, InfluxDB storage, live fleet view."""
