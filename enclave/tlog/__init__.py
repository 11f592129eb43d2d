"""A transparency log in the C2SP formats, sans I/O (docs/TRANSPARENCY.md).

``merkle`` (RFC 6962 / RFC 9162 hashing and proofs), ``note`` (c2sp.org/signed-note and the
cosignatures of c2sp.org/tlog-cosignature), ``checkpoint`` (c2sp.org/tlog-checkpoint), ``tiles``
(c2sp.org/tlog-tiles paths, tiles and entry bundles, proofs computed from tiles), ``entries``
(what the appliance logs, as versioned canonical JSON) and ``witness`` (the c2sp.org/tlog-witness
``add-checkpoint`` decision). Nothing here opens a socket or a file.
"""
