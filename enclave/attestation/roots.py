"""The vendor roots paygate ships (package data in ``roots/``), pinned here by SHA-256 of DER.

A root is trusted only because its fingerprint is written in this file: a changed or swapped
file raises instead of being trusted, and a root that arrives inside evidence is never trusted
on its own. The AMD files also hold the intermediate (ASK, or ASVK for VLEKs) that AMD publishes
beside each ARK; intermediates are checked against their ARK on every verification.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from cryptography import x509

from enclave.attestation.certs import fingerprint, load_certificates
from enclave.errors import EnclaveError

AMD_ARK_MILAN = "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"
AMD_ARK_GENOA = "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1"
INTEL_SGX_ROOT_CA = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
AWS_NITRO_ROOT_G1 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
NVIDIA_DEVICE_IDENTITY_CA = "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"

# file -> fingerprint of its last certificate (the root)
_FILES = {
    "amd_milan_ask_ark.pem": AMD_ARK_MILAN,
    "amd_milan_asvk_ark.pem": AMD_ARK_MILAN,
    "amd_genoa_ask_ark.pem": AMD_ARK_GENOA,
    "intel_sgx_root_ca.pem": INTEL_SGX_ROOT_CA,
    "aws_nitro_root_g1.pem": AWS_NITRO_ROOT_G1,
    "nvidia_device_identity_ca.pem": NVIDIA_DEVICE_IDENTITY_CA,
}


class RootMismatch(EnclaveError, RuntimeError):
    """A shipped root file does not match the fingerprint pinned in code (a damaged install)."""

    message = (
        "a shipped root file does not match the fingerprint pinned in code (a damaged install)"
    )

    code = "attestation_root_mismatch"


@cache
def _bundle(name: str) -> tuple[x509.Certificate, ...]:
    data = resources.files("enclave.attestation").joinpath("roots", name).read_bytes()
    certs = tuple(load_certificates(data))
    if fingerprint(certs[-1]) != _FILES[name]:
        raise RootMismatch(f"shipped root {name} does not match its pinned fingerprint")
    return certs


def amd_intermediates() -> tuple[x509.Certificate, ...]:
    """The ASKs (Milan, Genoa) and the ASVK (Milan) that AMD publishes beside the ARKs."""
    return tuple(
        _bundle(name)[0]
        for name in ("amd_milan_ask_ark.pem", "amd_genoa_ask_ark.pem", "amd_milan_asvk_ark.pem")
    )


def amd_arks() -> tuple[x509.Certificate, ...]:
    return (_bundle("amd_milan_ask_ark.pem")[-1], _bundle("amd_genoa_ask_ark.pem")[-1])


def intel_sgx_root() -> x509.Certificate:
    return _bundle("intel_sgx_root_ca.pem")[-1]


def aws_nitro_root() -> x509.Certificate:
    return _bundle("aws_nitro_root_g1.pem")[-1]


def nvidia_device_identity_ca() -> x509.Certificate:
    return _bundle("nvidia_device_identity_ca.pem")[-1]
