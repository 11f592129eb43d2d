"""``paygate deploy create|list|show|update|delete NAME``: named deployments (paygate.store).

``paygate serve NAME`` runs one. Files live in ``deployments_dir`` (0700 directories, 0600
files, atomic writes); names are ``[a-z0-9][a-z0-9-]{0,62}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from paygate.cli.options import FieldFlag, FieldFlags, add_action, add_json, command_actions
from paygate.cli.tables import print_table
from paygate.config import load_settings
from paygate.store.deployments import Deployment, DeploymentStore, build
from paygate.upstream.engines import profile_for

# flag -> deployment field (shared by create and update)
_FIELDS = FieldFlags(
    FieldFlag("--listen", "listen", "host:port the gateway listens on"),
    FieldFlag("--upstream-url", "upstream_url", "attach mode: the model server's URL"),
    FieldFlag("--mode", "upstream_mode", "attach | container"),
    FieldFlag("--wallet", "wallet_address", "payee address (0x...)"),
    FieldFlag("--price", "price_per_request", "price per request (USDC, decimal)"),
    FieldFlag("--price-per-million-tokens", "price_per_million_tokens", "price per 1M tokens"),
    FieldFlag(
        "--tokens-per-request", "approx_tokens_per_request", "approximate tokens a request", int
    ),
    FieldFlag("--chain", "chain", "payment network, e.g. base-sepolia"),
    FieldFlag("--facilitator-url", "facilitator_url", "x402 facilitator URL"),
    FieldFlag("--image", "container_image", "container mode: model server image"),
    FieldFlag("--cpus", "container_cpus", "container mode: CPU limit", float),
    FieldFlag("--memory", "container_memory", "container mode: memory limit, e.g. 8g"),
    FieldFlag("--host-port", "container_host_port", "kept for the reference format; unused", int),
    FieldFlag("--tee", "tee_type", "TEE type"),
    FieldFlag("--kind", "upstream_kind", "ollama | llama-server | vllm | openai"),
    FieldFlag("--model-path", "model_path", "the weights file served (llama-server: a GGUF)"),
    FieldFlag("--model-name", "model_name", "the name it is served under (default: file name)"),
    FieldFlag("--model-hash", "model_hash", "weights digest (default: computed from --model-path)"),
)


def register(sub: Any) -> None:
    fields = argparse.ArgumentParser(add_help=False)
    fields.add_argument("name")
    _FIELDS.add_to(fields)
    fields.add_argument(
        "--no-payment-gate",
        dest="no_payment_gate",
        action="store_const",
        const=True,
        default=None,
        help="serve without payments",
    )
    fields.add_argument(
        "--payment-gate",
        dest="no_payment_gate",
        action="store_const",
        const=False,
        help="serve with payments (the default)",
    )
    actions = command_actions(sub, "deploy", "manage named deployments (paygate serve NAME)")
    text = "create a deployment (refuses an existing name unless --force)"
    create = add_action(actions, "create", _create, text, parents=[fields])
    create.add_argument("--force", action="store_true", help="replace an existing one")
    add_action(actions, "update", _update, "change fields of a deployment", parents=[fields])
    add_json(add_action(actions, "list", _list, "list deployments"))
    add_action(actions, "show", _show, "print one deployment (JSON)").add_argument("name")
    add_action(actions, "delete", _delete, "delete a deployment").add_argument("name")


def _store(args: argparse.Namespace) -> DeploymentStore:
    return DeploymentStore(load_settings(args.config).deployments_dir)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    given = _FIELDS.given(args)
    if args.no_payment_gate is not None:
        given["no_payment_gate"] = args.no_payment_gate
    return given


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
