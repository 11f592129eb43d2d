"""Attestation evidence verifiers (bytes in, verdict out; no network) and evidence providers."""
