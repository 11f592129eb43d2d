"""The appliance's transparency log: storage (``store``), the gateway's service and routes
(``service``), the witness service (``witness_server``) and the client's checks (``client``).
The Merkle, note, tile and entry formats are in :mod:`enclave.tlog` (docs/TRANSPARENCY.md).
"""
