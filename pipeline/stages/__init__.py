"""The stages: plain functions a test can call, one concern each."""
