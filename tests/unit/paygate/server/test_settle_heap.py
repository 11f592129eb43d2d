"""Once listening, ``paygate serve`` moves what starting it built out of the cyclic collector's
reach (a full collection no longer walks every module and the app); garbage cycles made
afterwards, by requests, are still collected."""

from __future__ import annotations

import gc
import weakref

from paygate.server.app import settle_heap


class Node:
    def __init__(self) -> None:
        self.peer: Node = self


def test_the_start_heap_is_frozen_and_later_cycles_are_still_collected() -> None:
    kept = Node()  # a start-time cycle that stays alive
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert not any(obj is kept for obj in gc.get_objects())  # not walked any more
        made = Node()
        later = weakref.ref(made)
        del made
        gc.collect()
        assert later() is None
    finally:
        gc.unfreeze()
