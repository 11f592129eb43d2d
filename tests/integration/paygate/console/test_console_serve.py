"""`paygate serve --workers 2` with the console on its own port, and `paygate console login`: a
link printed by the command signs in once, whichever worker answers, and a session made by one
worker is good on the other (one secret, one ledger)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess

import aiohttp

from paygate.console import auth
from tests.fixtures.components import free_port
from tests.fixtures.scale_support import Env, fake_upstream, replicas
from tests.fixtures.serve_support import PAYGATE, make_key


async def test_the_console_of_two_workers_and_a_login_link(facilitator, seller, tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger' / 'payments.db'}"
    port = free_port()
    secret = tmp_path / "console-secret"
    secret.write_text("s" * 40)
    async with fake_upstream() as (_fake, upstream):
        env = Env(make_key(tmp_path / "key.pem"), url, seller, facilitator.url, upstream, tmp_path)
        env.extra.update(
            PAYGATE_CONSOLE_LISTEN=f"127.0.0.1:{port}",
            PAYGATE_CONSOLE_SECRET_FILE=str(secret),
        )
        async with replicas(env, ["w"], workers=2) as (parent,):
            assert len(parent.children()) == 2
            console = f"http://127.0.0.1:{port}"
            command = {
                **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
                "PAYGATE_LEDGER_URL": url,
                **env.extra,
            }
            printed = await asyncio.to_thread(
                subprocess.run,
                [PAYGATE, "console", "login"],
                env=command,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            link = printed.stdout.splitlines()[0]
            assert link.startswith(console + "/login/")
            token = link.rsplit("/", 1)[1]
            connector = aiohttp.TCPConnector(force_close=True)  # a new connection per request
            jar = aiohttp.CookieJar(unsafe=True)  # cookies of an IP-address host
            async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as client:
                async with client.get(link) as page:
                    assert page.status == 200
                    pre = re.search(r'name="pre" value="([0-9a-f]+)"', await page.text())[1]
                form = {"pre": pre, "token": token}
                async with client.post(console + "/login", data=form) as signed:
                    assert signed.status == 200
                    assert str(signed.url) == console + "/"
                assert client.cookie_jar.filter_cookies(console).get(auth.COOKIE)
                for _ in range(6):  # several connections: both workers answer with one session
                    async with client.get(console + "/payments", allow_redirects=False) as r:
                        assert r.status == 200
                async with client.post(console + "/login", data=form) as again:
                    assert again.status == 403  # used once
                # The gateway's port serves no console.
                async with client.get(parent.url + "/signin") as r:
                    assert r.status == 404
