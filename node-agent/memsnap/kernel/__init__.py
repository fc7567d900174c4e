"""Kernel ABI, one module per interface: numbers, structs and thin ctypes calls, no policy."""
