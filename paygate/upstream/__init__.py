"""The model servers behind the gateway: their settings (config, spec), one engine profile per
kind (engines/: routes, generation-length rules, probes), the body each gets (shaping) and the
usage its replies state (usage), a managed container (container, relay, pull, names, engine: the
docker connection) or an attached server, health (readiness, monitor, breaker), one upstream as
the gateway runs it (service) and the set the router picks from (fleet), discovery on this host,
and the forwarding client (http1). The FAKE model server of tests and demos is devtools'."""
