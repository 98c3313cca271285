"""twistd plugin: ``twistd -n greyfox``.  No __init__.py beside this file, on purpose."""

from twisted.application.service import ServiceMaker

greyfox = ServiceMaker(
    "GreyFox",
    "greyfox.tap",
    "Local-first LLM API proxy: cache, meter and cap OpenAI-compatible calls",
    "greyfox",
)
