"""Verification: each exported artefact, loaded the way its engine loads it, against the trained model."""
