"""Certifiers: proofs that no perturbation within a budget changes a classifier's answer."""
