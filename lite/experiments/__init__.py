"""Experiments that test the paper's claims at a scale this project can run."""
