"""A network's CAIP-2 id is made once, at construction: every way of making another network
from one (a changed copy, a pickle, a copy) carries the id of its own chain, never a stale one,
and the id takes no part in what a network is (equality, hash, repr)."""

from __future__ import annotations

import copy
import dataclasses
import pickle

from paygate.x402.networks import NETWORKS, resolve_network


def test_a_changed_copy_has_its_own_chains_id() -> None:
    for network in (*NETWORKS, resolve_network("eip155:31337")):
        moved = dataclasses.replace(network, chain_id=network.chain_id + 1)
        assert moved.caip2 == f"eip155:{network.chain_id + 1}"
        assert moved != network


def test_a_pickled_or_copied_network_is_the_same_network() -> None:
    for network in (*NETWORKS, resolve_network("eip155:31337")):
        pickled = pickle.loads(pickle.dumps(network))  # noqa: S301 - its own bytes
        for again in (pickled, copy.copy(network)):
            assert again == network
            assert hash(again) == hash(network)
            assert again.caip2 == network.caip2
        assert copy.deepcopy(network).caip2 == network.caip2


def test_a_custom_chain_from_its_caip2_id_resolves_to_one_network() -> None:
    first, second = resolve_network("eip155:31337"), resolve_network(" EIP155:31337 ")
    assert first == second
    assert len({first, second}) == 1
    assert first.caip2 == "eip155:31337"
