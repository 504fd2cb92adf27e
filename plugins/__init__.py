"""Built-in probe plugins: nvml, ascend, host, mock. Each registers through the `capmon.probes` entry-point group."""
