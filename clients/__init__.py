"""Clients of the matlora server: the Python client, ``matlora ask`` and ``matlora loadgen``.

The Python client lives in ``clients.client`` (``MatloraClient``, ``AsyncMatloraClient``
and the error classes). This module imports nothing, so the CLI can load it without httpx.
"""

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "MATLORA_API_KEY"
