"""Test support: the tiny real guest, its workload agent, and QEMU process control.

Used by the test suite, the benchmarks and the demo. Nothing in the product
proper imports from here.
"""
