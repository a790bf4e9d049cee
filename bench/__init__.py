"""Benchmarks of the service-user gateway; run them with `bash bench/run.sh` (see its header)."""
