"""One name per class in paygate/, and one error tree: every error of paygate and enclave is a
PaygateError or an EnclaveError that states its own wire message and stable code."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections import defaultdict
from pathlib import Path

import enclave
import paygate
from enclave.errors import EnclaveError
from paygate.errors import PaygateError

ROOT = Path(__file__).resolve().parents[2]

# Modules another branch of this session rewrites; their errors join the tree when it lands.
OWNED_ELSEWHERE = {
    "paygate.upstream.http1",  # Http1Error (f27)
    "paygate.x402.facilitator",  # _Garbage, a private sentinel (s24a)
    "paygate.x402.schemes",  # UnknownScheme (s24a)
    "paygate.x402.verify",  # PaymentRejected (s24a)
    "paygate.server.payments",  # _RefusalError (s24b)
}


def _owned_elsewhere(cls: type) -> bool:
    return any(cls.__module__.startswith(m) for m in OWNED_ELSEWHERE)


def test_no_two_classes_in_paygate_share_a_name() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted((ROOT / "paygate").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    shared = {name: places for name, places in where.items() if len(places) > 1}
    assert not shared


def _modules() -> list[str]:
    names = []
    for package in (paygate, enclave):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return names


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def test_every_error_is_in_the_tree_with_its_own_message_and_code() -> None:
    errors: list[type[BaseException]] = []
    for name in _modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Exception)
                and not issubclass(value, Warning)
                and value.__module__ == name
            ):
                errors.append(value)
    assert len(errors) > 100  # the walk found the packages' errors
    outside = [
        f"{e.__module__}.{e.__qualname__}"
        for e in errors
        if not issubclass(e, PaygateError | EnclaveError) and not _owned_elsewhere(e)
    ]
    assert not outside, "errors outside PaygateError/EnclaveError"
    tree = _subclasses(PaygateError) | _subclasses(EnclaveError) | {PaygateError, EnclaveError}
    without = [
        f"{e.__module__}.{e.__qualname__}"
        for e in tree
        if e.__module__.startswith(("paygate.", "enclave."))
        and not _owned_elsewhere(e)
        and not (isinstance(vars(e).get("message"), str) and vars(e)["message"])
    ]
    assert not sorted(without), "errors without their own wire message"
    without_code = [e for e in tree if not (isinstance(getattr(e, "code", None), str) and e.code)]  # type: ignore[attr-defined]
    assert not without_code


def test_an_error_raised_without_a_message_says_its_own() -> None:
    from paygate.client.errors import EkUntrusted
    from paygate.x402.ledger import LedgerConflict

    assert str(LedgerConflict()) == LedgerConflict.message
    assert str(EkUntrusted("the EK is a stranger")) == "the EK is a stranger"
