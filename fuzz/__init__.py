"""Fuzzing netchan's decoders: the harness (shared with tests/test_decoders.py),
the coverage-guided targets and their runner (``make fuzz``)."""
