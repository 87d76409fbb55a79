"""Service secrets: credentials the units load, the manifest, the inventory, bad names."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleet.inventory import Secret, parse
from tests.nix.conftest import Nix

SECRETS_VIEW = """
let c = h.hostConfig f {host}; in {{
  credentials = builtins.mapAttrs (_: u: u.serviceConfig.LoadCredential or null) c.systemd.services;
  manifest = builtins.fromJSON c.environment.etc."fleet/manifest.json".text;
  tmpfiles = c.systemd.tmpfiles.rules;
  failed = c.failedAssertions;
}}
"""

UPLOADS = "/var/lib/fleet/secrets"


@pytest.fixture(scope="module")
def access(nix: Nix) -> dict[str, Any]:
    hosts = " ".join(
        f"{n} = {SECRETS_VIEW.format(host=json.dumps(n))};" for n in ["app1", "db1", "edge1"]
    )
    return nix.eval(  # type: ignore[no-any-return]
        f"let f = {nix.fleet('access.nix')}; in {{ {hosts} inventory = f.config.build.inventory; }}"
    )


def test_a_generated_unit_loads_its_credentials(access: dict[str, Any]) -> None:
    assert access["app1"]["credentials"]["fleet-api"] == [
        f"db-password:{UPLOADS}/api/db-password",
        "tls-key:/run/agenix/api-tls-key",
        f"token:{UPLOADS}/api/token",
    ]


def test_a_module_run_unit_loads_its_credentials(access: dict[str, Any]) -> None:
    assert access["db1"]["credentials"]["cache"] == [
        f"cache-password:{UPLOADS}/cache/cache-password"
    ]


def test_a_path_on_the_host_is_loaded_as_it_is(access: dict[str, Any]) -> None:
    # `%` would be a systemd specifier: it is doubled.
    assert access["edge1"]["credentials"]["fleet-proxy"] == ["tls.key:/run/secrets/proxy%%tls"]


def test_units_without_secrets_load_nothing(access: dict[str, Any]) -> None:
    assert access["app1"]["credentials"]["fleet-host-boot"] is None


def test_the_manifest_lists_every_secret(access: dict[str, Any]) -> None:
    assert access["app1"]["manifest"]["secrets"] == [
        {
            "service": "api",
            "name": "db-password",
            "path": f"{UPLOADS}/api/db-password",
            "upload": True,
            "file": "db-password",
        },
        {
            "service": "api",
            "name": "tls-key",
            "path": "/run/agenix/api-tls-key",
            "upload": False,
            "file": None,
        },
        {
            "service": "api",
            "name": "token",
            "path": f"{UPLOADS}/api/token",
            "upload": True,
            "file": "api-token",
        },
    ]
    assert access["edge1"]["manifest"]["secrets"] == [
        {
            "service": "proxy",
            "name": "tls.key",
            "path": "/run/secrets/proxy%tls",
            "upload": False,
            "file": None,
        }
    ]


def test_the_inventory_lists_what_the_tool_uploads(access: dict[str, Any]) -> None:
    hosts = access["inventory"]["hosts"]
    assert hosts["app1"]["secrets"] == [
        {
            "service": "api",
            "name": "db-password",
            "file": "db-password",
            "path": f"{UPLOADS}/api/db-password",
        },
        {"service": "api", "name": "token", "file": "api-token", "path": f"{UPLOADS}/api/token"},
    ]
    # cache uses the same file of the operator's folder under its own name
    assert hosts["db1"]["secrets"] == [
        {
            "service": "cache",
            "name": "cache-password",
            "file": "db-password",
            "path": f"{UPLOADS}/cache/cache-password",
        }
    ]
    # a secret already on the host is not the tool's to upload
    assert hosts["edge1"]["secrets"] == []
    inventory = parse(access["inventory"], "tests/nix/fixtures/access.nix")
    assert inventory.hosts["db1"].secrets == (
        Secret("cache", "cache-password", "db-password", f"{UPLOADS}/cache/cache-password"),
    )


def test_the_upload_folder_is_root_only(access: dict[str, Any]) -> None:
    rule = f"d {UPLOADS} 0700 root root - -"
    assert rule in access["app1"]["tmpfiles"] and rule in access["db1"]["tmpfiles"]
    # nothing to upload there
    assert rule not in access["edge1"]["tmpfiles"]


def test_the_same_credential_name_in_two_services_and_an_unhardened_unit(nix: Nix) -> None:
    host = nix.eval(
        """let c = h.hostConfig (h.evalFleet [ ({ pkgs, ... }: {
          imports = [ tests/nix/fixtures/base.nix ];
          services.api.secrets.password = { };
          services.legacy = {
            package = pkgs.fake "legacy";
            placement.hosts = [ "app1" ];
            hardening = false;
            secrets.password = { };
          };
        }) ]) "app1"; in {
          failed = c.failedAssertions;
          api = c.systemd.services.fleet-api.serviceConfig.LoadCredential;
          legacy = c.systemd.services.fleet-legacy.serviceConfig.LoadCredential;
        }"""
    )
    assert host == {
        "failed": [],
        "api": [f"password:{UPLOADS}/api/password"],
        "legacy": [f"password:{UPLOADS}/legacy/password"],
    }


# The example: redis's password and its clients'.


@pytest.fixture(scope="module")
def example(nix: Nix) -> dict[str, Any]:
    return nix.eval(  # type: ignore[no-any-return]
        """
        let
          f = h.example;
          db1 = f.config.build.hosts.db1;
          # redis's module with the plan, its options stubbed.
          redis = (h.evalHost [
            (h.repo + "/modules/host.nix")
            { fleet = db1.plan; nixpkgs.hostPlatform = db1.system; }
            (h.lib.last db1.modules)
            {
              options.services.redis.servers = h.lib.mkOption {
                type = h.lib.types.attrsOf (h.lib.types.attrsOf h.lib.types.anything);
              };
            }
          ]).services.redis.servers.main;
        in {
          inherit redis;
          inventory = f.config.build.inventory;
        }
        """
    )


def test_the_example_uploads_one_password_for_redis_and_its_clients(
    example: dict[str, Any],
) -> None:
    hosts = example["inventory"]["hosts"]
    for host, service in [("app1", "api"), ("app2", "api"), ("db1", "redis")]:
        assert hosts[host]["secrets"] == [
            {
                "service": service,
                "name": "redis-password",
                "file": "redis-password",
                "path": f"{UPLOADS}/{service}/redis-password",
            }
        ]


def test_the_example_redis_reads_its_credential_and_listens_privately(
    example: dict[str, Any],
) -> None:
    redis = example["redis"]
    assert redis["requirePassFile"] == "/run/credentials/redis-main.service/redis-password"
    assert "requirePass" not in redis
    assert redis["bind"] == "127.0.0.1 192.0.2.21"


# Mistakes.


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (
            '"../up".path = "/run/x"',
            'secret "../up": a credential name must match [A-Za-z0-9][A-Za-z0-9_.-]{0,254}',
        ),
        (
            '"a:b" = { }',
            'secret "a:b": a credential name must match [A-Za-z0-9][A-Za-z0-9_.-]{0,254}',
        ),
        (
            'token.path = "run/agenix/token"',
            'secret "token": path "run/agenix/token" must be an absolute path on the host',
        ),
        (
            'token.path = "/run/a\\nb"',
            'secret "token": path "/run/a\\nb" must be an absolute path on the host',
        ),
        (
            "token.file = null",
            'secret "token": set `file` (a file of the operator\'s secrets folder) or `path`',
        ),
    ],
    ids=["dots", "colon", "relative-path", "newline", "nothing"],
)
def test_bad_secrets_are_refused(nix: Nix, secret: str, message: str) -> None:
    fleet = f"""(h.evalFleet [ {{
      imports = [ tests/nix/fixtures/base.nix ];
      services.api.secrets.{secret};
    }} ])"""
    error = nix.error(f"{fleet}.config.build.inventory")
    assert "fleet: the declaration has 1 problem(s)" in error
    assert f'service "api": {message}' in error


def test_the_host_module_alone_asserts_the_same(nix: Nix) -> None:
    failed = nix.eval(
        """(h.evalHost [
          (h.repo + "/modules/host.nix")
          {
            fleet = {
              enable = true;
              hostName = "solo";
              services.api = {
                command = [ "/bin/api" ];
                secrets."../up" = { };
                secrets.token.path = "token";
              };
            };
            nixpkgs.hostPlatform = "x86_64-linux";
          }
        ]).failedAssertions"""
    )
    assert failed == [
        'fleet: host solo: service "api": secret "../up": a credential name must match '
        "[A-Za-z0-9][A-Za-z0-9_.-]{0,254} (one file name: letters, digits, `_`, `.`, `-`)\n"
        'fleet: host solo: service "api": secret "token": path "token" must be an absolute '
        "path on the host (starting with /, on one line)"
    ]


@pytest.mark.parametrize("file", ["../etc/passwd", "sub/file", ".hidden"])
def test_a_file_outside_the_secrets_folder_is_refused(nix: Nix, file: str) -> None:
    error = nix.error(
        f"""(h.evalFleet [ {{
          imports = [ tests/nix/fixtures/base.nix ];
          services.api.secrets.token.file = {json.dumps(file)};
        }} ]).config.build.inventory"""
    )
    assert "services.api.secrets.token.file" in error
    assert "string matching the pattern [A-Za-z0-9][A-Za-z0-9_.-]{0,254}" in error
