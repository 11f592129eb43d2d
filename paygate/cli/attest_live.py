"""``paygate attest show`` and ``paygate attest verify``: the live evidence (TPM, TEE, none).

``show`` says, offline, what this appliance would attest: the evidence kind, the keys, the
models and payment terms it binds, the code and configuration digests and the PCR 23 value a
verifier expects. ``verify URL`` runs the client's verifier (paygate.client.attestation)
against a live gateway and prints every check. Exit status: 0 when every check passed, 1 when
verification failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import warnings
from typing import Any

import httpx

from enclave import KeyBackend, p256
from enclave.attestation import tpm
from paygate.client.attestation import (
    AttestationPolicy,
    Attested,
    UnpinnedCode,
    attestation_flow,
)
from paygate.client.errors import AttestationRefused, ClientError
from paygate.client.pubkey import MAX_PUBKEY_DOCUMENT, PUBKEY_PATH, parse_pubkey_document
from paygate.config import Settings, load_settings
from paygate.errors import PaygateError

_PCR = re.compile(r"(\d{1,2})=([0-9a-fA-F]{64})")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class AttestUsageError(PaygateError):
    """An ``attest`` action (show, verify, verify-file) was given something it cannot use."""

    message = "the attest command was given something it cannot use"

    code = "attest_usage"


def add_show(actions: Any) -> None:
    show = actions.add_parser("show", help="what this appliance would attest (offline)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=_show)


def add_verify(actions: Any) -> None:
    verify = actions.add_parser(
        "verify",
        help="attest a live gateway with the client's verifier",
        description="Exit status: 0 every check passed, 1 verification failed, 2 usage error.",
    )
    verify.add_argument("url", help="the gateway, e.g. http://127.0.0.1:8402")
    verify.add_argument(
        "--ek-ca", help="PEM file: the trusted TPM EK root and any intermediates", required=False
    )
    verify.add_argument(
        "--model-digest", action="append", default=[], help="accepted sha256:HEX (repeatable)"
    )
    verify.add_argument("--pay-to", help="the wallet the evidence must name")
    verify.add_argument(
        "--code-digest",
        action="append",
        default=[],
        help="accepted gateway code sha256:HEX (repeatable; `paygate release digest`)",
    )
    verify.add_argument(
        "--policy",
        help="JSON file: the accepted TEE kinds (sev-snp, tdx, nitro), each with its policy",
    )
    verify.add_argument(
        "--pcr", action="append", default=[], help="expected sha256 PCR value N=HEX (repeatable)"
    )
    verify.add_argument("--max-age", type=int, default=300, help="seconds (default 300)")
    verify.add_argument(
        "--allow-unattested", action="store_true", help="accept kind none (software keys)"
    )
    verify.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(run=_verify)


def _policy(args: argparse.Namespace) -> AttestationPolicy:
    pcrs: dict[int, bytes] = {}
    for item in args.pcr:
        match = _PCR.fullmatch(item.strip())
        if match is None or int(match[1]) > 23:
            raise AttestUsageError(f"--pcr takes N=HEX (N 0..23, 64 hex digits), not {item[:80]!r}")
        pcrs[int(match[1])] = bytes.fromhex(match[2])
    for digest in args.model_digest:
        if not _DIGEST.fullmatch(digest):
            raise AttestUsageError("--model-digest takes sha256:<64 lower-case hex digits>")
    for digest in args.code_digest:
        if not _DIGEST.fullmatch(digest):
            raise AttestUsageError("--code-digest takes sha256:<64 lower-case hex digits>")
    if args.pay_to is not None and not re.fullmatch(r"0x[0-9a-fA-F]{40}", args.pay_to):
        raise AttestUsageError("--pay-to takes a 0x-prefixed 20-byte address")
    if args.ek_ca is None and args.policy is None and not args.allow_unattested:
        raise AttestUsageError(
            "--ek-ca (TPM) or --policy (TEE kinds) is required"
            " (or --allow-unattested for kind none only)"
        )
    try:
        with warnings.catch_warnings():
            # Unpinned code is reported as the skipped "code" check instead.
            warnings.simplefilter("ignore", UnpinnedCode)
            return _from_files(args, pcrs)
    except ValueError as exc:
        raise AttestUsageError(str(exc)) from None


def _from_files(args: argparse.Namespace, pcrs: dict[int, bytes]) -> AttestationPolicy:
    return AttestationPolicy.from_files(
        args.ek_ca,
        model_digests=args.model_digest,
        pay_to=args.pay_to,
        pcrs=pcrs or "any",
        max_age_seconds=args.max_age,
        allow_unattested=args.allow_unattested,
        tee_policy=args.policy,
        code_digests=args.code_digest,
    )


def _verify(args: argparse.Namespace) -> int:
    try:
        policy = _policy(args)
        url = httpx.URL(args.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise AttestUsageError("the URL must be http:// or https:// with a host")
    except AttestUsageError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2
    origin = f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")
    checks: tuple[Any, ...] = ()
    attested: Attested | None = None
    failure: ClientError | None = None
    try:
        with httpx.Client(timeout=args.timeout, trust_env=False) as http:
            key_doc = _get(http, origin + PUBKEY_PATH, MAX_PUBKEY_DOCUMENT)
            key = parse_pubkey_document(origin, *key_doc)
            flow = attestation_flow(origin, policy, key.public_key)
            try:
                exchange = next(flow)
                while True:
                    if exchange.method == "GET":
                        result = _get(http, exchange.url, 1 << 20)
                    else:
                        result = _post(http, exchange.url, exchange.body or b"")
                    exchange = flow.send(result)
            except StopIteration as stop:
                attested = stop.value
                checks = attested.checks
    except AttestationRefused as exc:
        failure, checks = exc, exc.checks
    except ClientError as exc:
        failure = exc
    except httpx.HTTPError as exc:
        failure = ClientError(f"cannot reach {origin}: {type(exc).__name__}")
        failure.code = "evidence_unavailable"
    _report(args.json, origin, checks, attested, failure)
    return 0 if failure is None else 1


def _get(http: httpx.Client, url: str, limit: int) -> tuple[int, bytes]:
    with http.stream("GET", url, headers={"Accept": "application/json"}) as response:
        return response.status_code, _bounded(response, limit)


def _post(http: httpx.Client, url: str, body: bytes) -> tuple[int, bytes]:
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    with http.stream("POST", url, content=body, headers=headers) as response:
        return response.status_code, _bounded(response, 64 * 1024)


def _bounded(response: httpx.Response, limit: int) -> bytes:
    data = bytearray()
    for chunk in response.iter_raw():
        data += chunk
        if len(data) > limit:
            raise ClientError("the gateway's answer is too large")
    return bytes(data)


def _report(
    as_json: bool,
    origin: str,
    checks: tuple[Any, ...],
    attested: Attested | None,
    failure: ClientError | None,
) -> None:
    if as_json:
        document: dict[str, Any] = {
            "url": origin,
            "ok": failure is None,
            "code": failure.code if failure else None,
            "checks": [
                {"name": c.name, "status": c.status, "code": c.code or None, "detail": c.detail}
                for c in checks
            ],
        }
        if attested is not None:
            document["kind"] = attested.kind
            document["binding"] = attested.binding.document()
        print(json.dumps(document, indent=2))
        return
    for check in checks:
        mark = {"pass": "ok  ", "fail": "FAIL", "skip": "skip"}[check.status]
        code = f" [{check.code}]" if check.code else ""
        print(f"{mark} {check.name:22}{code} {check.detail}")
    if failure is None and attested is not None:
        print(f"attested: {origin} (kind {attested.kind})")
    elif failure is not None:
        print(f"refused [{failure.code}]: {failure}", file=sys.stderr)


def show_facts(settings: Settings, key: KeyBackend) -> dict[str, Any]:
    """What a gateway with these settings and this key would attest, found without starting
    it (the facts ``attest show`` prints)."""
    # The server's assembly is the one place that knows what is bound: reuse it.
    from paygate.server.app import attestation_config, configured_channels
    from paygate.server.attestation import AttestationService, parse_models
    from paygate.upstream.service import served_digests

    # The weights' digests as the gateway computes them at start (attach mode: from
    # upstream_model_path; hashing a large file takes a while).
    entries = settings.upstream_entries()
    if len(entries) == 1:
        served = [item.as_dict() for item in served_digests(settings.upstream(), None)]
    else:  # several: each model with its upstream, as the running gateway binds them
        served = [
            {**item.as_dict(), "upstream": entry.name}
            for entry in entries
            for item in served_digests(entry.config, None)
        ]
    config = dataclasses.replace(
        attestation_config(settings, channels=configured_channels(settings)),
        models=parse_models(served),
    )
    service = AttestationService(config, key)
    code = bytes.fromhex(config.code_digest.removeprefix("sha256:"))
    config_digest = service.config_digest()
    facts: dict[str, Any] = {
        "kind": config.kind,
        "sealing_key": p256.fingerprint(key.public_key),
        "receipt_key": p256.fingerprint(service.receipt_public_key),
        "models": [{"name": m.name, "digest": m.digest} for m in config.models],
        # Offline, the upto facilitator's address and a facilitator's channel receiver
        # authorizer are unknown (the gateway asks them at start); in chain mode the
        # authorizer is the gas key's address, so the channel terms are here.
        "payment": None if config.payment is None else config.payment.document(),
        "gateway": {"version": config.gateway_version, "code_digest": config.code_digest},
        "config_digest": "sha256:" + config_digest.hex(),
        "pcr23": tpm.app_pcr_value(tpm.app_digest(code, config_digest)).hex(),
    }
    if config.kind == "tpm":
        facts["ek_certificates"] = sorted(service.ek_certificate_kinds())
    return facts


def _show(args: argparse.Namespace) -> int:
    from paygate.keys import open_key_backend

    settings = load_settings(args.config)
    key = open_key_backend(settings)
    try:
        facts = show_facts(settings, key)
    finally:
        key.close()
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        for name, value in facts.items():
            text = value if isinstance(value, str) else json.dumps(value)
            print(f"{name:16} {text}")
    return 0
