"""Running ``dockmirror-admin`` against a test server's key store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO_ROOT, Dockmirror
from .registries import subprocess_env

#: The installed console script, as operators run it.
ADMIN = str(Path(sys.executable).with_name("dockmirror-admin"))


def admin(mirror: Dockmirror, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``dockmirror-admin --config <the mirror's config> ARGS`` (the venv's script)."""
    return subprocess.run(
        [ADMIN, "--config", str(mirror.config_path), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
        env=subprocess_env(
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.getenv("PYTHONPATH")]))
        ),
    )


def create_key(mirror: Dockmirror, name: str = "test", *options: str) -> tuple[str, str]:
    """A new key's ``(appId, apiKey)``."""
    created = json.loads(admin(mirror, "keys", "create", "--name", name, *options).stdout)
    return created["appId"], created["apiKey"]


def list_keys(mirror: Dockmirror) -> dict[str, dict[str, object]]:
    """``keys list --json``, by appId."""
    return {k["appId"]: k for k in json.loads(admin(mirror, "keys", "list", "--json").stdout)}
