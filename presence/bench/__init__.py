"""Benchmarks that print numbers: latency, CPU per call, Full-Duplex-Bench."""
