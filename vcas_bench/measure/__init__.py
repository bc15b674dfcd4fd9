"""Measurement: synchronized timers, memory, and (see :mod:`vcas_bench.measure.flops`) FLOPs."""
