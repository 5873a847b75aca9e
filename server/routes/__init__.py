"""HTTP routes: the probes and metrics, ``/generate``, and the OpenAI-compatible API."""
