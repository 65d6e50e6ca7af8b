"""deploy/compose.yaml against the Compose Specification's JSON schema.

The schema is the one check-jsonschema 0.39.0 (PyPI, a dev dependency) vendors as
`vendor.compose-spec` (its builtin_schemas/vendor/compose-spec.json, "Compose Specification",
draft 2020-12): no copy is committed here, and `check-jsonschema` is the stock validator.
Docker itself cannot run on this machine, so this is what `docker compose config` would
refuse before it starts anything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"
CHECK = Path(sys.executable).parent / "check-jsonschema"


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHECK), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_compose_file_follows_the_compose_spec():
    result = validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_refuses_a_broken_compose_file(tmp_path):
    """The check can fail: a misspelt service key, and a port given as a mapping."""
    compose = yaml.safe_load(COMPOSE.read_text())
    compose["services"]["icegate"]["restart_policy"] = "always"
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(compose))
    result = validate(broken)
    assert result.returncode != 0
    assert "restart_policy" in result.stdout + result.stderr

    compose = yaml.safe_load(COMPOSE.read_text())
    compose["services"]["redis"]["ports"] = [{"published": "x", "bogus": 1}]
    broken.write_text(yaml.safe_dump(compose))
    assert validate(broken).returncode != 0

