"""Program modules that cannot be used, one way each (tests/bridge_child/test_registry.py)."""
