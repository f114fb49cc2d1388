"""Test harnesses (plain Python, no pytest)."""
