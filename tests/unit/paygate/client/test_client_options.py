"""Both transports take the same options, and a misspelt one is refused, never dropped: a
dropped ``pin`` or ``spend`` would silently run without the protection asked for."""

from __future__ import annotations

from typing import Any

import pytest

from paygate.client import AsyncPaygateTransport, PaygateTransport


@pytest.mark.parametrize("cls", [PaygateTransport, AsyncPaygateTransport])
def test_a_misspelt_option_is_refused(cls: Any) -> None:
    with pytest.raises(TypeError, match="'pinn'"):
        cls(pinn="ab" * 32)


@pytest.mark.parametrize("cls", [PaygateTransport, AsyncPaygateTransport])
def test_options_reach_the_core(cls: Any) -> None:
    transport = cls(envelope="plain", pin="ab" * 32, max_request_bytes=1234)
    assert transport._core.envelope == "plain"
    assert transport._core.pin is not None
    assert transport._core.max_request_bytes == 1234
    assert cls()._core.envelope == "v2"  # the defaults, as before
    with pytest.raises(ValueError, match="envelope"):
        cls(envelope="v3")
