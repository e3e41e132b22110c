"""Suite-wide settings. Each test folder keeps its own fixtures in its own conftest.py."""
