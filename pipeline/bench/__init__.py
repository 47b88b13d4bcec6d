"""`pipeline bench ...`: throughput and quality benchmarks with targets that can fail."""
