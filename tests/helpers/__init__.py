"""Shared helpers of the tests (no tests here): imported as tests.helpers.<name>."""
