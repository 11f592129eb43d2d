"""The operator console in a real browser: Debian's headless Chromium driven by Playwright,
against a gateway that took real payments (anvil + the SDK facilitator, the FAKE model server).

Why Playwright (on the system Chromium, nothing downloaded) rather than Selenium and
chromedriver: its waits are built into every action (no sleeps, no timed assertions), a context
can run with JavaScript off (every page must work without it) and can inject a wallet provider
(``window.ethereum``) backed by a Python signer, and it reads cookies and takes full-page
screenshots directly.

Screenshots of every page go to a scratch directory, or to $PAYGATE_CONSOLE_SHOTS
(`PAYGATE_CONSOLE_SHOTS=docs/console` refreshes the ones docs/CONSOLE.md shows).
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

import aiohttp
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from paygate.console import auth
from paygate.economics.open_store import economics_store
from paygate.server.app import PAYMENTS
from paygate.x402.ledger import PaymentState
from tests.fixtures.console_support import SECRET, SHOTS, browser, console_stack
from tests.fixtures.payment_support import CHAT, paid_settings

pytestmark = pytest.mark.timeout(300)

PROMPT = "the secret prompt 7f3a9c"
HOSTILE_MODEL = '<img src=x onerror="document.title=1"><script>document.title=2</script>'
LIMITS = {"*": {"per_payer": 1, "shadow": True}, "model:fake-llama": {"per_payer": 10**9}}


async def pay(console, payer, model: str = "fake-llama") -> tuple[int, bytes]:
    from types import SimpleNamespace

    from paygate import wire
    from tests.fixtures.payment_support import v2_header

    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    async with aiohttp.ClientSession() as client:
        header = await v2_header(
            SimpleNamespace(client=client, url=console.gateway), payer, body=body
        )
        async with client.post(
            console.gateway + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}
        ) as response:
            return response.status, await response.read()


async def sign_in_with_wallet(page, console, operator) -> None:
    """The no-JavaScript path: ask for the message, sign it elsewhere, paste the signature."""
    await page.goto(console.url + "/signin")
    await page.fill("#wallet", operator.address)
    await page.click("text=Get the message to sign")
    message = await page.inner_text("#message")
    signature = Account.sign_message(encode_defunct(text=message), operator.key).signature
    await page.fill("#signature", "0x" + signature.hex().removeprefix("0x"))
    await page.click("button[type=submit]:has-text('Sign in')")
    await page.wait_for_url(console.url + "/")


async def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def test_every_page_after_a_real_paid_run(facilitator, usdc, payer, seller, tmp_path):
    operator = Account.create()
    ledger_url = f"sqlite:///{tmp_path / 'payments.db'}"
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger_url,
        console_wallets=operator.address,
        token_limits=LIMITS,
        budgets={"day": {"per_payer": "1", "shadow": True}},
    )
    async with console_stack(**settings) as console:
        assert (await pay(console, payer))[0] == 200
        assert (await pay(console, payer, HOSTILE_MODEL))[0] == 200
        assert (await pay(console, payer))[0] == 200
        facilitator.set_fault("settlement_pending", "settle")  # money moves, answer unknown
        assert (await pay(console, payer))[0] == 200
        facilitator.reset()
        processor = console.app[PAYMENTS].processor
        await processor.settlements.drain(10)
        ledger = processor.ledger
        records = await ledger.list(limit=10)
        flagged = [r for r in records if r.needs_review]
        assert len(flagged) == 1
        settled = [r for r in records if r.state is PaymentState.SETTLED]
        assert len(settled) == 3
        signatures = [json.loads(r.payload)["payload"]["signature"] for r in records]

        async with browser(javascript=False) as context:
            page = await context.new_page()
            await sign_in_with_wallet(page, console, operator)
            cookie = next(c for c in await context.cookies() if c["name"] == auth.COOKIE)
            assert cookie["httpOnly"]
            assert cookie["sameSite"] == "Strict"
            pages = {}
            for name, path in [
                ("overview", "/"),
                ("payments", "/payments"),
                ("payment", f"/payments/{settled[0].id}"),
                ("review", "/review"),
                ("upstream", "/upstream"),
                ("trust", "/trust"),
                ("limits", "/limits"),
            ]:
                response = await page.goto(console.url + path)
                assert response.status == 200, path
                assert "content-security-policy" in response.headers
                pages[name] = await page.content()
                await shot(page, name)
            # The hostile model name renders inert: as text, never as an element.
            await page.goto(console.url + "/limits")
            assert await page.locator("img").count() == 0
            assert await page.locator("main script").count() == 0
            assert await page.title() == "Limits and budgets · paygate console"
            assert HOSTILE_MODEL in await page.inner_text("main")

            # Filters: by state, and by payer (the payer's own address, any case).
            await page.goto(console.url + "/payments?state=settling")
            assert await page.locator("tbody tr").count() == 1
            await page.goto(console.url + "/payments?payer=" + payer.address.lower())
            assert await page.locator("tbody tr").count() == 4
            await page.goto(console.url + "/payments?model=fake-llama&scheme=upto")
            assert "No payments." in await page.inner_text("main")

            # Review: prove again (nothing here can prove it: it is flagged again), then fail.
            await page.goto(console.url + "/review")
            await page.click("button:has-text('Prove again')")
            await page.wait_for_url(re.compile(r".*/review\?done=prove"))
            history = await ledger.history(flagged[0].id)
            assert any(
                e.replica.endswith("/console") and e.error == "settlement_pending" for e in history
            )
            assert (await ledger.get(flagged[0].id)).needs_review
            await page.fill("input[name=reason]", "refunded off-chain <b>by hand</b>")
            await page.click("button:has-text('Mark failed')")
            await page.wait_for_url(re.compile(r".*/review\?done=fail"))
            await shot(page, "review-done")
            failed = await ledger.get(flagged[0].id)
            assert failed.state is PaymentState.FAILED
            assert failed.error == "operator: refunded off-chain <b>by hand</b>"
            await page.goto(console.url + f"/payments/{failed.id}")
            assert await page.locator("main b").count() == 0

    # Nothing secret, no prompt, no signature on any page.
    for name, html in pages.items():
        assert PROMPT not in html, name
        assert SECRET not in html, name
        for signature in signatures:
            assert signature.removeprefix("0x") not in html, name
    assert "4 payment(s)" not in pages["overview"]
    assert "1 payment(s) need review" in pages["overview"]
    assert "0.001000 USDC" in pages["payment"]
    assert settled[0].transaction in pages["payment"]
    assert "ledger history" in pages["payment"].lower()
    assert "shadow" in pages["limits"]


async def test_a_login_link_signs_in_once_and_a_browser_wallet_signs_with_javascript(
    facilitator, seller, tmp_path
):
    operator = Account.create()
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=f"sqlite:///{tmp_path / 'p.db'}",
        console_wallets=operator.address,
    )
    async with console_stack(**settings) as console:
        token = auth.new_link_token()
        store = economics_store(console.app[PAYMENTS].processor.ledger)
        await store.put_login(auth.token_hash("link", token), store.now() + 600)
        async with browser(javascript=False) as context:
            page = await context.new_page()
            await page.goto(console.url + f"/login/{token}")
            await shot(page, "login-link")
            await page.click("#use-link")
            await page.wait_for_url(console.url + "/")
            assert "login-link" in await page.inner_text("header")
        async with browser(javascript=False) as context:  # the same link, again: refused
            page = await context.new_page()
            await page.goto(console.url + f"/login/{token}")
            await page.click("#use-link")
            assert "used or has expired" in await page.inner_text("main")

        # With JavaScript and a browser wallet (EIP-1193 provider backed by a Python signer).
        async with browser() as context:
            page = await context.new_page()

            async def personal_sign(message: str, address: str) -> str:
                assert address == operator.address
                signed = Account.sign_message(encode_defunct(text=message), operator.key)
                return "0x" + signed.signature.hex().removeprefix("0x")

            await page.expose_function("pySign", personal_sign)
            await page.add_init_script(
                "window.ethereum = {request: ({method, params}) =>"
                " method === 'personal_sign' ? window.pySign(params[0], params[1])"
                " : Promise.reject(new Error('unsupported'))};"
            )
            await page.goto(console.url + "/signin?wallet=" + operator.address)
            await shot(page, "signin")
            await page.click("#browser-wallet")
            await page.wait_for_url(console.url + "/")
            assert operator.address in await page.inner_text("header")


async def test_logged_out_csrf_and_strangers_are_refused(facilitator, seller, tmp_path):
    operator, stranger = Account.create(), Account.create()
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=f"sqlite:///{tmp_path / 'p.db'}",
        console_wallets=operator.address,
    )
    async with console_stack(**settings) as console:
        async with browser(javascript=False) as context:
            page = await context.new_page()
            # Logged out: every page sends the browser to sign in, and back after.
            await page.goto(console.url + "/review")
            assert unquote(page.url) == console.url + "/signin?next=/review"
            # A wallet not on the allow-list signs correctly and is still refused.
            await sign_in_with_wallet_expecting_refusal(page, console, stranger)
            await sign_in_with_wallet(page, console, operator)
            # A form without its CSRF token (a forged cross-site post) is refused.
            response = await page.request.post(
                console.url + "/review/" + "0" * 32, form={"action": "fail", "reason": "x"}
            )
            assert response.status == 403
            assert "CSRF" in await response.text()
            response = await page.request.post(console.url + "/signout", form={"csrf": "0" * 64})
            assert response.status == 403
        # Without a session, a POST is refused outright and no page leaks.
        async with aiohttp.ClientSession() as client:
            async with client.post(console.url + "/review/" + "0" * 32, allow_redirects=False) as r:
                assert r.status == 403
            async with client.get(console.url + "/payments", allow_redirects=False) as r:
                assert r.status == 303
                assert r.headers["Location"].startswith("/signin?next=")
            # An off-site "next" never becomes a redirect to another origin.
            async with client.get(console.url + "/signin?next=//evil.example/x") as r:
                assert "evil.example" not in await r.text()
        # The console is not on the gateway's port.
        async with aiohttp.ClientSession() as client, client.get(console.gateway + "/signin") as r:
            assert r.status == 404


async def sign_in_with_wallet_expecting_refusal(page, console, wallet) -> None:
    await page.goto(console.url + "/signin")
    await page.fill("#wallet", wallet.address)
    await page.click("text=Get the message to sign")
    message = await page.inner_text("#message")
    signature = Account.sign_message(encode_defunct(text=message), wallet.key).signature
    await page.fill("#signature", "0x" + signature.hex().removeprefix("0x"))
    await page.click("button[type=submit]:has-text('Sign in')")
    assert "may not sign in here" in await page.inner_text("main")
