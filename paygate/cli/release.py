"""``paygate release digest``: the code digest a caller pins (AttestationPolicy.code_digests).

Without arguments, the digest of the paygate this command runs from, the same value a gateway
started from this installation extends into PCR 23 and names in its evidence; with ``--wheel``,
the digest a wheel will have once installed (docs/ATTESTATION.md "Pinning the code").
"""

from __future__ import annotations

import argparse
from typing import Any

from paygate import release


def register(sub: Any) -> None:
    p = sub.add_parser("release", help="facts about this paygate release (its code digest)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    digest = actions.add_parser(
        "digest",
        help="print the code digest of the installed paygate (or of a wheel)",
        description="Print sha256:HEX, the code digest a gateway running this code attests.",
    )
    digest.add_argument("--wheel", help="a paygate wheel file: its digest once installed")
    digest.set_defaults(run=_digest)


def _digest(args: argparse.Namespace) -> int:
    value = release.wheel_code_digest(args.wheel) if args.wheel else release.code_digest()
    print(value)
    return 0
