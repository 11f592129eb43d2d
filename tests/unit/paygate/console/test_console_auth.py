"""Console sign-in on its own (the console app on a temporary SQLite ledger, no gateway): signed
sessions refuse tampering and expiry, a signed sign-in message is good once, and the side doors
(another domain, a stale message, a huge signature) are shut."""

from __future__ import annotations

import re
import time

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account
from eth_account.messages import encode_defunct

from paygate.config import load_settings
from paygate.console import auth
from paygate.console.app import build_console


def test_a_session_cookie_is_refused_when_tampered_with_or_expired():
    sessions = auth.Sessions(b"k" * 32, seconds=60)
    cookie, session = sessions.issue("0xabc", "wallet", now=1000.0)
    assert sessions.read(cookie, 1001.0) == session
    assert sessions.read(cookie, 1061.0) is None  # expired
    body, mac = cookie.rsplit(".", 1)
    assert sessions.read(body + "." + "0" * 64, 1001.0) is None
    assert sessions.read(body[:-2] + "AA." + mac, 1001.0) is None
    assert sessions.read(cookie, 1001.0) is not None
    assert auth.Sessions(b"x" * 32, seconds=60).read(cookie, 1001.0) is None  # another key
    for junk in ("", ".", "a.b", "x" * 2000, None):
        assert sessions.read(junk, 1001.0) is None
    assert sessions.check_csrf(session, sessions.csrf(session))
    assert not sessions.check_csrf(session, None)
    other = sessions.issue("0xabc", "wallet", now=1000.0)[1]
    assert not sessions.check_csrf(other, sessions.csrf(session))  # bound to its session
    with pytest.raises(ValueError, match="16 bytes"):
        auth.Sessions(b"short", seconds=60)


def test_the_eip1271_call_is_is_valid_signature_of_the_digest():
    call = auth.is_valid_signature_call("0x" + "11" * 20, b"\x22" * 32, "0x" + "33" * 65)
    data = bytes.fromhex(call["data"][2:])
    assert data[:4].hex() == "1626ba7e"
    assert data[4:36] == b"\x22" * 32
    assert int.from_bytes(data[36:68], "big") == 64
    assert int.from_bytes(data[68:100], "big") == 65
    assert data[100:165] == b"\x33" * 65
    assert len(data) % 32 == 4


@pytest.fixture
async def console(tmp_path):
    operator = Account.create()
    settings = load_settings(
        None,
        console_listen="127.0.0.1:0",
        console_secret="s" * 32,
        console_wallets=operator.address,
        ledger_path=tmp_path / "p.db",
    )
    runner = web.AppRunner(build_console(settings, web.Application()))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        yield url, client, operator
    await runner.cleanup()


async def _message(client, url, address):
    async with client.get(url + "/signin", params={"wallet": address}) as page:
        text = await page.text()
    fields = dict(re.findall(r'name="(pre|address|nonce|issued_at)" value="([^"]*)"', text))
    message = re.search(r'<pre id="message">(.*?)</pre>', text, re.S)[1]
    return fields, message.replace("&#39;", "'").replace("&amp;", "&")


async def test_a_signed_message_signs_in_once(console):
    url, client, operator = console
    fields, message = await _message(client, url, operator.address)
    signature = Account.sign_message(encode_defunct(text=message), operator.key).signature.hex()
    form = {**fields, "signature": "0x" + signature.removeprefix("0x")}
    async with client.post(url + "/signin", data=form) as answer:
        assert answer.status == 200
        assert str(answer.url) == url + "/"
    # The same signed message again, with a valid form token: the nonce is spent.
    async with client.get(url + "/signin") as page:
        pre = re.search(r'name="pre" value="([^"]*)"', await page.text())
    assert pre is None  # the first sign-in page has no form token field; the cookie holds it
    token = client.cookie_jar.filter_cookies(url)[auth.PRE_COOKIE].value
    async with client.post(url + "/signin", data={**form, "pre": token}) as replay:
        assert replay.status == 403
        assert "already used" in await replay.text()


async def test_side_doors_of_the_wallet_sign_in(console):
    url, client, operator = console
    fields, message = await _message(client, url, operator.address)

    def signed(text: str) -> str:
        raw = Account.sign_message(encode_defunct(text=text), operator.key).signature.hex()
        return "0x" + raw.removeprefix("0x")

    # A message for another domain (phished elsewhere) does not match this console's.
    elsewhere = message.replace("127.0.0.1", "evil.example")
    async with client.post(url + "/signin", data={**fields, "signature": signed(elsewhere)}) as r:
        assert r.status == 403
    # A stale issue time: the server rebuilds the message and the window has passed.
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    stale = {**fields, "issued_at": old}
    async with client.post(url + "/signin", data={**stale, "signature": signed(message)}) as r:
        assert r.status == 403
    # And the honest signature still works: none of the above used the nonce up.
    async with client.post(url + "/signin", data={**fields, "signature": signed(message)}) as r:
        assert r.status == 200
        assert str(r.url) == url + "/"


async def test_a_huge_signature_or_a_form_without_its_token_is_refused(console):
    url, client, operator = console
    fields, message = await _message(client, url, operator.address)
    raw = Account.sign_message(encode_defunct(text=message), operator.key).signature.hex()
    good = "0x" + raw.removeprefix("0x")
    # A huge signature is refused without work; no pre token: refused as a forged form.
    async with client.post(url + "/signin", data={**fields, "signature": "0x" + "ab" * 5000}) as r:
        assert r.status == 403
    async with client.post(url + "/signin", data={**fields, "pre": "", "signature": good}) as r:
        assert r.status == 403


async def test_sign_in_attempts_are_rate_limited(console):
    url, client, _ = console
    statuses = []
    for _ in range(8):
        async with client.post(url + "/login", data={"pre": "x", "token": "y"}) as r:
            statuses.append(r.status)
    assert statuses[:5] == [403] * 5
    assert 429 in statuses[5:]
