"""GreyFox: a local-first proxy that meters, caches and caps paid LLM API calls.

Point an OpenAI-compatible client's base URL at ``http://localhost:8080/v1``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
