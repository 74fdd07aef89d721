"""The real-condition suites, one file per subject; the shared harness is ../conftest.py."""
