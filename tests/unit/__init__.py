"""Unit tests, one folder per runtime package; none needs root."""
