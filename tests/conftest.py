"""Shared pytest set-up. Test helpers live in tests/support/ (import them as tests.support.X)."""
