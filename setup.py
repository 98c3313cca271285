"""GreyFox: a local-first proxy that meters, caches and caps paid LLM API calls."""

from setuptools import setup

setup(
    name="greyfox",
    version="0.1.0",
    description="Local-first OpenAI-compatible proxy: cache, meter and cap LLM API spend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # No __init__.py under twisted/: the plugin file drops into Twisted's own
    # namespace-style plugin package (see STACK-NOTES A6).
    # The console's static files live in web/ at the top of the repo and are
    # installed as greyfox/web so an installed proxy can serve them.
    packages=["greyfox", "greyfox.web", "twisted.plugins"],
    package_dir={"greyfox.web": "web"},
    package_data={
        "greyfox": ["data/*.gz"],
        "greyfox.web": ["*.html", "*.js", "*.css", "*.svg"],
    },
    install_requires=[
        "twisted[tls]>=24.7",  # TLS: pyOpenSSL and service_identity, for HTTPS upstreams
        "klein>=24.8",
        "treq>=24.9",
        "tiktoken>=0.8",
        "attrs>=23.1",
        "regex>=2023.0",
        "prometheus_client>=0.20",
        "genai-prices>=0.2.3",  # the price database: maintained, offline, historic and per-provider rates
    ],
    extras_require={
        # GREYFOX_DB=postgresql://... (several instances on one database, SPEC 8)
        "postgres": ["psycopg[binary]>=3.1"],
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",  # a Deferred that never fires fails its test, with every thread's stack
            "hypothesis>=6.100",
            "openai>=1.40",
            "anthropic>=0.40",
            "psycopg[binary]>=3.1",  # the engine tests on PostgreSQL
            "playwright>=1.40",
        ],
    },
    entry_points={"console_scripts": ["greyfox = greyfox._cli:main"]},
)
