"""``paygate deploy create|list|show|update|delete NAME``: named deployments (paygate.store).

``paygate serve NAME`` runs one. Files live in ``deployments_dir`` (0700 directories, 0600
files, atomic writes); names are ``[a-z0-9][a-z0-9-]{0,62}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from paygate.cli.tables import print_table
from paygate.config import load_settings
from paygate.store.deployments import Deployment, DeploymentStore, build
from paygate.upstream.engines import profile_for

# flag -> deployment field (shared by create and update)
_FIELDS = (
    ("--listen", "listen", str, "host:port the gateway listens on"),
    ("--upstream-url", "upstream_url", str, "attach mode: the model server's URL"),
    ("--mode", "upstream_mode", str, "attach | container"),
    ("--wallet", "wallet_address", str, "payee address (0x...)"),
    ("--price", "price_per_request", str, "price per request (USDC, decimal)"),
    ("--price-per-million-tokens", "price_per_million_tokens", str, "price per 1M tokens"),
    ("--tokens-per-request", "approx_tokens_per_request", int, "approximate tokens a request"),
    ("--chain", "chain", str, "payment network, e.g. base-sepolia"),
    ("--facilitator-url", "facilitator_url", str, "x402 facilitator URL"),
    ("--image", "container_image", str, "container mode: model server image"),
    ("--cpus", "container_cpus", float, "container mode: CPU limit"),
    ("--memory", "container_memory", str, "container mode: memory limit, e.g. 8g"),
    ("--host-port", "container_host_port", int, "kept for the reference format; unused"),
    ("--tee", "tee_type", str, "TEE type"),
    ("--kind", "upstream_kind", str, "ollama | llama-server | vllm | openai"),
    ("--model-path", "model_path", str, "the weights file served (llama-server: a GGUF)"),
    ("--model-name", "model_name", str, "the name it is served under (default: file name)"),
    ("--model-hash", "model_hash", str, "weights digest (default: computed from --model-path)"),
)


def register(sub: Any) -> None:
    deploy = sub.add_parser("deploy", help="manage named deployments (paygate serve NAME)")
    actions = deploy.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    for action, run, text in (
        ("create", _create, "create a deployment (refuses an existing name unless --force)"),
        ("update", _update, "change fields of a deployment"),
    ):
        p = actions.add_parser(action, help=text)
        p.add_argument("name")
        for flag, dest, kind, help_text in _FIELDS:
            p.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
        p.add_argument(
            "--no-payment-gate",
            dest="no_payment_gate",
            action="store_const",
            const=True,
            default=None,
            help="serve without payments",
        )
        p.add_argument(
            "--payment-gate",
            dest="no_payment_gate",
            action="store_const",
            const=False,
            help="serve with payments (the default)",
        )
        if action == "create":
            p.add_argument("--force", action="store_true", help="replace an existing one")
        p.set_defaults(run=run)
    listing = actions.add_parser("list", help="list deployments")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)
    show = actions.add_parser("show", help="print one deployment (JSON)")
    show.add_argument("name")
    show.set_defaults(run=_show)
    delete = actions.add_parser("delete", help="delete a deployment")
    delete.add_argument("name")
    delete.set_defaults(run=_delete)


def _store(args: argparse.Namespace) -> DeploymentStore:
    return DeploymentStore(load_settings(args.config).deployments_dir)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    names = [dest for _, dest, _, _ in _FIELDS] + ["no_payment_gate"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _print(deployment: Deployment) -> None:
    print(json.dumps(deployment.document(), indent=2, sort_keys=True))


def _with_digest(fields: dict[str, Any], current: Deployment | None = None) -> dict[str, Any]:
    """A given model path without a given hash: record the weights' digest as served now."""
    if "model_path" not in fields or "model_hash" in fields:
        return fields
    kind = fields.get("upstream_kind") or (current.upstream_kind if current else None)
    name = fields.get("model_name") or (current.model_name if current else None)
    served = profile_for(kind or "llama-server").digests(Path(fields["model_path"]), name)
    if len(served) == 1:
        fields["model_hash"] = served[0].digest
    return fields


def _create(args: argparse.Namespace) -> int:
    fields = _with_digest(_given(args))
    deployment = _store(args).create(build(args.name, **fields), force=args.force)
    _print(deployment)
    return 0


def _update(args: argparse.Namespace) -> int:
    store = _store(args)
    _print(store.update(args.name, **_with_digest(_given(args), store.get(args.name))))
    return 0


def _list(args: argparse.Namespace) -> int:
    deployments = _store(args).list()
    if args.json:
        print(json.dumps([d.document() for d in deployments], indent=2, sort_keys=True))
        return 0
    rows = [("NAME", "MODE", "LISTEN", "UPSTREAM", "UPDATED")]
    for d in deployments:
        upstream = d.container_image or "(container)" if d.upstream_mode == "container" else None
        rows.append((d.name, d.upstream_mode, d.listen, upstream or d.upstream_url, d.updated_at))
    print_table(rows)
    return 0


def _show(args: argparse.Namespace) -> int:
    _print(_store(args).get(args.name))
    return 0


def _delete(args: argparse.Namespace) -> int:
    _store(args).delete(args.name)
    print(f"deleted {args.name}")
    return 0
