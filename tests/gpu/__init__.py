"""GPU tests (a package, so that its conftest and modules do not shadow tests/conftest.py's names)."""
