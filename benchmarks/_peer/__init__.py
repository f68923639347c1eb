"""Helpers of `benchmarks/compare.py`: server launchers, load generators, wrk scripts.

Files here are run by other interpreters too (`praisonai_server.py` runs in the peer's own
venv), so each launcher is a standalone script with no imports from the rest.
"""
