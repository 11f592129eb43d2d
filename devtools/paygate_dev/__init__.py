"""paygate's test and demo tooling: never imported by the shipped ``paygate`` package.

``paygate demo`` and ``paygate fake-upstream`` come from here, registered through the
``paygate.commands`` entry point group (devtools/pyproject.toml) when this package is installed.
"""
