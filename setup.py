"""Packaging for dockmirror."""

from setuptools import find_packages, setup

CLUSTER = ["psycopg[binary]>=3.1", "psycopg-pool>=3.2", "botocore>=1.31"]

setup(
    name="dockmirror",
    version="0.1.0",
    description="A pull-through caching mirror for container registries",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests*", "bench*"]) + ["twisted.plugins"],
    package_data={
        "dockmirror": [
            "py.typed",
            "*.toml",
            "auth/*.sql",
            "cache/*.sql",
            "cluster/*.sql",
            "portal/*.sql",
            "portal/static/*",
        ]
    },
    install_requires=[
        "twisted[tls,conch]>=23.10",
        "treq>=23.11",
        "service-identity>=23.1",
        "pyopenssl>=23.2",
        "zope.interface>=6.0",
        "PyJWT[crypto]>=2.8",
        "prometheus_client>=0.19",
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-twisted>=1.14",
            # A hung test fails after pyproject.toml's timeout, with the stacks of its
            # threads, instead of holding the run up until CI gives up on it.
            "pytest-timeout>=2.1",
            "mypy>=1.8",
            "mypy-zope>=1.0",
            "ruff>=0.4",
            "hypothesis>=6.100",
            # Importable h2 makes Twisted offer HTTP/2 unless the site pins
            # HTTP/1.1; tests/integration/test_http2.py checks the pin.
            "h2>=4.1",
            # The portal's tests: an OAuth2/OIDC provider stand-in, HTTP sessions, a browser
            # (Debian's chromium and chromium-driver, installed by .ci/run).
            "authlib>=1.6",
            "flask>=3.0",
            "requests>=2.31",
            "selenium>=4.20",
            *CLUSTER,
        ],
        # Several nodes sharing PostgreSQL and an S3 bucket: [cluster] and [storage].
        "cluster": CLUSTER,
        # python -m bench draws its chart with matplotlib when it is installed.
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": ["dockmirror-admin=dockmirror.admin:main"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Software Distribution",
    ],
)
