"""The keys of a section whose connections go out: the TLS it trusts and presents, its proxy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from dockmirror.config.values import ConfigError
from dockmirror.egress import UpstreamTLS, load_upstream_tls
from dockmirror.proxy import ProxyRules, proxy_rules

if TYPE_CHECKING:
    from dockmirror.config.storage import StorageConfig
    from dockmirror.config.upstreams import UpstreamConfig


def section_tls(where: str, section: UpstreamConfig | StorageConfig) -> UpstreamTLS:
    """A section's ``ca``, ``client_cert`` and ``client_key``, read and checked.

    ValueError names *where* (``upstreams.NAME``, ``storage``), the key and the file.
    """
    try:
        return load_upstream_tls(section.ca, section.client_cert, section.client_key)
    except ValueError as e:
        raise ValueError(f"{where}.{e}") from None


def section_proxies(
    where: str, section: UpstreamConfig | StorageConfig, environ: Mapping[str, str]
) -> ProxyRules:
    """A section's proxy rules: its ``proxy`` keys, or else the *environ* variables."""
    try:
        return proxy_rules(
            section.proxy,
            section.proxy_username,
            section.proxy_password,
            section.no_proxy,
            environ,
        )
    except ValueError as e:
        raise ValueError(f"{where}{'.' if section.proxy is not None else ': '}{e}") from None


def check_proxy_keys(where: str, section: UpstreamConfig | StorageConfig) -> None:
    if (section.proxy_username is None) != (section.proxy_password is None):
        raise ConfigError(f"{where}: proxy_username and proxy_password go together")
    if section.proxy is None and (section.proxy_username is not None or section.no_proxy):
        raise ConfigError(f"{where}: proxy_username and no_proxy need a proxy")
