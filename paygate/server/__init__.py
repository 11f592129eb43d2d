"""The aiohttp adapter: app factory, route table, request pipeline, streaming proxy, health."""
