"""Tests of the async notes service."""
