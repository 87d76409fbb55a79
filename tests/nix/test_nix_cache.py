"""The binary cache: the inventory's `cache`, the problems of a declaration, every host's
substituter and trusted key, and the cache host's nginx (checked by nginx's own parser
when it is installed), tmpfiles, firewall and manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleet.inventory import parse
from tests.nix.conftest import FIXTURES, Nix, nix_path
from tests.nix.test_nix_traffic import iptables

HOSTS = ["app1", "app2", "cache1", "db1"]
FLEET = ["10.0.0.11", "10.0.0.12", "10.0.0.51", "10.0.0.21"]  # by host name
KEY = "fleet-test-cache-1:Zm9yIHRoZSB0ZXN0cyBvbmx5LCBuZXZlciBhIGtleSE="
URL = "http://10.0.0.51:5080"

HOST_VIEW = """
let c = h.hostConfig f {host}; in {{
  nix = c.nix.settings;
  nginx = c.services.nginx;
  tmpfiles = c.systemd.tmpfiles.rules;
  iptables = c.networking.firewall.extraCommands;
  stop = c.networking.firewall.extraStopCommands;
  nftables = c.networking.firewall.extraInputRules;
  manifest = builtins.fromJSON c.environment.etc."fleet/manifest.json".text;
  inherit (c) warnings failedAssertions;
}}
"""

GENERATOR = 'import (h.repo + "/fleet/nix/cache.nix")'


def views(nix: Nix, fleet: str, hosts: list[str] = HOSTS) -> dict[str, Any]:
    body = " ".join(f"{n} = {HOST_VIEW.format(host=json.dumps(n))};" for n in hosts)
    return nix.eval(  # type: ignore[no-any-return]
        f"let f = {fleet}; b = f.config.build; in {{ hosts = {{ {body} }}; "
        "inherit (b) inventory problems; "
        f"generated = if b.inventory.cache == null then null "
        f"else {GENERATOR} {{ inherit (b.inventory) cache; }}; }}"
    )


def fleet(*declarations: str) -> str:
    """The cache fixture with more declarations."""
    return f"(h.evalFleet [ {nix_path(FIXTURES / 'cache.nix')} {' '.join(declarations)} ])"


@pytest.fixture(scope="module")
def fixture(nix: Nix) -> dict[str, Any]:
    return views(nix, nix.fleet("cache.nix"))


def problems(nix: Nix, *declarations: str) -> list[str]:
    return nix.eval(f"{fleet(*declarations)}.config.build.problems")  # type: ignore[no-any-return]


# The inventory.


def test_the_inventory_names_the_cache(fixture: dict[str, Any]) -> None:
    assert fixture["problems"] == []
    assert fixture["inventory"]["cache"] == {
        "host": "cache1",
        "address": "10.0.0.51",
        "port": 5080,
        "url": URL,
        "publicKey": KEY,
        "directory": "/var/lib/fleet-cache",
    }


def test_the_inventory_passes_the_schema(fixture: dict[str, Any]) -> None:
    inventory = parse(fixture["inventory"], "tests/nix/fixtures/cache.nix")
    assert sorted(inventory.hosts) == HOSTS


def test_the_schema_refuses_a_cache_it_cannot_use(fixture: dict[str, Any]) -> None:
    from fleet.errors import InventoryError

    for field, value in [
        ("url", "http://10.0.0.51:5080/ x"),
        ("publicKey", "no-colon"),
        ("directory", "/var/lib/fleet cache"),
        ("port", 0),
    ]:
        inventory = json.loads(json.dumps(fixture["inventory"]))
        inventory["cache"][field] = value
        with pytest.raises(InventoryError, match=f"cache.{field}"):
            parse(inventory, "test")
    inventory = json.loads(json.dumps(fixture["inventory"]))
    del inventory["cache"]["publicKey"]
    with pytest.raises(InventoryError, match="publicKey"):
        parse(inventory, "test")


def test_the_options_fill_the_inventory(nix: Nix) -> None:
    cache = nix.eval(
        f"""{
            fleet('''{ cache = { hostTag = "store"; port = 8081; directory = "/srv/cache"; };
          hosts.db1.tags = h.lib.mkForce [ "data" "store" ]; }''')
        }.config.build.inventory.cache"""
    )
    assert cache == {
        "host": "db1",
        "address": "10.0.0.21",
        "port": 8081,
        "url": "http://10.0.0.21:8081",
        "publicKey": KEY,
        "directory": "/srv/cache",
    }


def test_an_ipv6_cache_host_is_written_with_brackets(nix: Nix) -> None:
    v6 = '{ hosts.cache1.address = h.lib.mkForce "2001:db8::51"; }'
    url = nix.eval(f"{fleet(v6)}.config.build.inventory.cache.url")
    assert url == "http://[2001:db8::51]:5080"


def test_without_a_cache_host_there_is_no_cache(nix: Nix) -> None:
    result = views(nix, nix.fleet("base.nix"), ["app1", "db1"])
    assert result["inventory"]["cache"] is None
    assert result["generated"] is None
    for name, host in result["hosts"].items():
        assert "substituters" not in host["nix"], name
        assert "trusted-public-keys" not in host["nix"], name
        assert "narinfo-cache-negative-ttl" not in host["nix"], name
        assert host["nginx"]["enable"] is False, name
        assert host["manifest"]["cache"] is None, name
        assert "fleet binary cache" not in host["iptables"], name
        assert not any("fleet-cache" in rule for rule in host["tmpfiles"]), name


def test_a_public_key_without_a_cache_host_changes_nothing(nix: Nix) -> None:
    result = nix.eval(
        f"""let f = h.evalFleet [ {nix_path(FIXTURES / "base.nix")}
          {{ cache.publicKey = "{KEY}"; }} ]; c = h.hostConfig f "app1"; in
        {{ cache = f.config.build.inventory.cache; nix = c.nix.settings; }}"""
    )
    assert result["cache"] is None
    assert "substituters" not in result["nix"]


# Problems of a declaration.


def test_two_cache_hosts(nix: Nix) -> None:
    assert problems(nix, '{ hosts.db1.tags = h.lib.mkForce [ "data" "cache" ]; }') == [
        'cache: hosts "cache1" and "db1" both carry the tag "cache" (cache.hostTag), but a '
        "fleet has one binary cache: keep the tag on one of them"
    ]
    three = problems(
        nix,
        '{ hosts.db1.tags = h.lib.mkForce [ "data" "cache" ]; }',
        '{ hosts.app2.tags = h.lib.mkForce [ "app" "cache" ]; }',
    )
    assert three == [
        'cache: hosts "app2", "cache1" and "db1" all carry the tag "cache" (cache.hostTag), '
        "but a fleet has one binary cache: keep the tag on one of them"
    ]


def test_a_cache_host_without_a_public_key(nix: Nix) -> None:
    assert problems(nix, "{ cache.publicKey = h.lib.mkForce null; }") == [
        'cache: host "cache1" carries the tag "cache" (cache.hostTag), but cache.publicKey is '
        "not set, and no host would trust what the cache serves: make the cache's key pair "
        "with `nix-store --generate-binary-cache-key NAME secret public`, set cache.publicKey "
        "to the contents of `public`, and put `secret` on the cache host at "
        "cache.secretKeyFile (/var/lib/fleet-cache-key/secret)"
    ]


def test_a_secret_key_in_the_store(nix: Nix) -> None:
    store = nix.eval("builtins.storeDir")
    found = problems(nix, f'{{ cache.secretKeyFile = "{store}/abc-cache-key"; }}')
    assert found == [
        f'cache: secretKeyFile "{store}/abc-cache-key" is in the Nix store, which every user '
        "of every host can read: the secret key must never be built into a system; deliver it "
        "to the cache host out of band and set cache.secretKeyFile to its path there (a "
        "string, not a Nix path)"
    ]
    # A Nix path is not even a string.
    error = nix.error(f"{fleet('{ cache.secretKeyFile = ./secret; }')}.config.build.inventory")
    assert "cache.secretKeyFile" in error


@pytest.mark.parametrize("path", ["secret", "/var/lib/cache key/secret", "/var/lib/k;ey"])
def test_a_secret_key_path_the_host_cannot_take(nix: Nix, path: str) -> None:
    assert problems(nix, f"{{ cache.secretKeyFile = {json.dumps(path)}; }}") == [
        f"cache: secretKeyFile {json.dumps(path)} must be an absolute path on the cache host, "
        "of letters, digits, `_`, `.`, `-` and `/`"
    ]


def test_the_cache_port_claimed_by_another(nix: Nix) -> None:
    assert problems(nix, "{ cache.port = 22; }") == [
        'host "cache1": port 22 is claimed twice, by sshd (sshPort) and the binary cache '
        "(cache.port): set cache.port to a port no host uses"
    ]
    # Only the cache host runs it.
    assert problems(nix, "{ cache.port = 8080; }") == []


@pytest.mark.parametrize(
    ("declaration", "option"),
    [
        ('{ cache.publicKey = h.lib.mkForce "no-colon"; }', "cache.publicKey"),
        ('{ cache.publicKey = h.lib.mkForce "a b:AAAA"; }', "cache.publicKey"),
        ('{ cache.directory = "relative"; }', "cache.directory"),
        ('{ cache.directory = "/srv/fleet cache"; }', "cache.directory"),
        ("{ cache.port = 65536; }", "cache.port"),
    ],
)
def test_bad_values_fail_evaluation_naming_the_option(
    nix: Nix, declaration: str, option: str
) -> None:
    assert option in nix.error(f"{fleet(declaration)}.config.build.inventory")


# Every host.


def test_every_host_substitutes_from_the_cache_first(fixture: dict[str, Any]) -> None:
    for name, host in fixture["hosts"].items():
        assert host["failedAssertions"] == [] and host["warnings"] == [], name
        settings = host["nix"]
        assert settings["substituters"] == [URL], name
        assert settings["trusted-public-keys"] == [KEY], name
        # A miss is not remembered: the next deploy asks the cache again.
        assert settings["narinfo-cache-negative-ttl"] == 0, name
        assert settings["connect-timeout"] == 5, name


def test_the_cache_comes_before_the_hosts_own_substituters(nix: Nix) -> None:
    settings = nix.eval(
        f"""let f = {fleet()}; in (h.evalHost (f.config.build.hosts.app1.modules ++ [ {{
          nix.settings.substituters = [ "https://cache.nixos.org/" ];
          nix.settings.trusted-public-keys = [ "cache.nixos.org-1:AAAA" ];
          nix.settings.narinfo-cache-negative-ttl = 60;
        }} ])).nix.settings"""
    )
    assert settings["substituters"] == [URL, "https://cache.nixos.org/"]
    assert sorted(settings["trusted-public-keys"]) == sorted([KEY, "cache.nixos.org-1:AAAA"])
    # The host's own choice wins over the module's default.
    assert settings["narinfo-cache-negative-ttl"] == 60


def test_the_operators_signing_keys_stay_apart(nix: Nix) -> None:
    settings = nix.eval(
        f"""(h.hostConfig {fleet('{ trustedPublicKeys = [ "operator-1:BBBB" ]; }')} "app1")
        .nix.settings"""
    )
    assert settings["extra-trusted-public-keys"] == ["operator-1:BBBB"]
    assert settings["trusted-public-keys"] == [KEY]


# The cache host.


def test_the_cache_host_runs_nginx_with_the_generated_server(fixture: dict[str, Any]) -> None:
    nginx = fixture["hosts"]["cache1"]["nginx"]
    assert nginx["enable"] is True
    assert nginx["appendHttpConfig"] == fixture["generated"]["server"]
    assert "listen 5080;" in nginx["appendHttpConfig"]
    assert "root /var/lib/fleet-cache;" in nginx["appendHttpConfig"]
    # No default `localhost` server on port 80.
    assert nginx["virtualHosts"] == {}
    for name in ("app1", "app2", "db1"):
        assert fixture["hosts"][name]["nginx"]["enable"] is False, name


def test_the_cache_host_makes_the_folders(fixture: dict[str, Any]) -> None:
    rules = fixture["hosts"]["cache1"]["tmpfiles"]
    assert "d /var/lib/fleet-cache 0755 root root - -" in rules
    assert "d /var/lib/fleet-cache-key 0700 root root - -" in rules
    assert not any("fleet-cache" in r for r in fixture["hosts"]["app1"]["tmpfiles"])


def test_a_key_elsewhere_is_left_to_what_puts_it_there(nix: Nix) -> None:
    rules = nix.eval(
        f"""(h.hostConfig {fleet('{ cache.secretKeyFile = "/run/agenix/cache-key"; }')}
        "cache1").systemd.tmpfiles.rules"""
    )
    assert "d /var/lib/fleet-cache 0755 root root - -" in rules
    assert not any("agenix" in r or "fleet-cache-key" in r for r in rules)


def test_the_cache_port_is_open_to_the_fleets_hosts_only(fixture: dict[str, Any]) -> None:
    cache1 = fixture["hosts"]["cache1"]
    rules = cache1["iptables"].splitlines()
    assert rules == ["# fleet binary cache", *iptables(5080, FLEET)]
    assert "iptables -w -D nixos-fw -p tcp --dport 5080 -s 10.0.0.11" in cache1["stop"]
    for name in ("app1", "app2", "db1"):
        assert "5080" not in fixture["hosts"][name]["iptables"], name


def test_the_cache_port_with_nftables(nix: Nix) -> None:
    nft = "{ hosts.cache1.modules = [ { networking.nftables.enable = true; } ]; }"
    nftables = nix.eval(f'(h.hostConfig {fleet(nft)} "cache1").networking.firewall.extraInputRules')
    assert nftables.splitlines() == [
        f'ip saddr {a} tcp dport 5080 accept comment "fleet binary cache"' for a in FLEET
    ]


def test_the_cache_hosts_manifest_says_where_and_with_what(fixture: dict[str, Any]) -> None:
    assert fixture["hosts"]["cache1"]["manifest"]["cache"] == {
        "directory": "/var/lib/fleet-cache",
        "secretKeyFile": "/var/lib/fleet-cache-key/secret",
    }
    for name in ("app1", "app2", "db1"):
        assert fixture["hosts"][name]["manifest"]["cache"] is None, name


def test_hosts_known_by_name_get_a_warning(nix: Nix) -> None:
    warnings = nix.eval(
        f"""(h.hostConfig {fleet('{ hosts.db1.address = h.lib.mkForce "db1.example.org"; }')}
        "cache1").warnings"""
    )
    assert warnings == [
        "fleet: host cache1: the binary cache's port is open to the fleet's hosts, but the "
        "firewall cannot match DNS names (db1.example.org): those hosts cannot fetch from the "
        "cache, and every deploy copies their closures from the operator's machine; declare "
        "them by IP address."
    ]


# The host module alone: its assertions.


def host_alone(nix: Nix, cache: str) -> list[str]:
    return nix.eval(  # type: ignore[no-any-return]
        f"""(h.evalHost [ (h.repo + "/modules/host.nix") {{
          fleet = {{ enable = true; hostName = "c"; cache = {cache}; }};
          nixpkgs.hostPlatform = "x86_64-linux";
        }} ]).failedAssertions"""
    )


def test_a_cache_url_without_a_key_is_refused(nix: Nix) -> None:
    assert host_alone(nix, '{ url = "http://192.0.2.51:5080"; }') == [
        "fleet: host c: the fleet has a binary cache, but fleet.cache.publicKey is not set, and "
        "Nix refuses every path the cache offers without a trusted signature: set "
        "cache.publicKey in the fleet's declaration to the public half of the cache's key "
        "(`nix-store --generate-binary-cache-key NAME secret public` writes it to `public`)."
    ]


def test_a_cache_host_with_its_key_in_the_store_is_refused(nix: Nix) -> None:
    store = nix.eval("builtins.storeDir")
    serve = (
        '{ host = "c"; address = "192.0.2.51"; port = 5080; url = "http://192.0.2.51:5080"; '
        f'publicKey = "{KEY}"; directory = "/var/lib/fleet-cache"; }}'
    )
    failed = host_alone(
        nix,
        f'{{ url = "http://192.0.2.51:5080"; publicKey = "{KEY}"; serve = {serve}; '
        f'secretKeyFile = "{store}/abc-key"; }}',
    )
    assert failed == [
        f'fleet: host c: fleet.cache.secretKeyFile is "{store}/abc-key", in the Nix store, '
        "which every user of the host can read: never build the cache's secret key into a "
        "system; deliver it to the host out of band and set cache.secretKeyFile to its path "
        "there (a string, not a Nix path)."
    ]


# nginx's own parser.


@pytest.fixture(scope="module")
def nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


def nginx_check(nginx: str, http: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`nginx -t` of an http block as NixOS's module writes one, around `http`."""
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"pid {tmp_path}/nginx.pid;\n"
        "error_log stderr;\n"
        "daemon off;\n"
        "events {\n}\n"
        "http {\n"
        "  default_type application/octet-stream;\n"
        f"  client_body_temp_path {tmp_path}/body;\n"
        f"  proxy_temp_path {tmp_path}/proxy;\n"
        f"  fastcgi_temp_path {tmp_path}/fastcgi;\n"
        f"  uwsgi_temp_path {tmp_path}/uwsgi;\n"
        f"  scgi_temp_path {tmp_path}/scgi;\n"
        f"  access_log {tmp_path}/access.log;\n"
        "  server_tokens off;\n"
        f"{http}\n"
        "}\n"
    )
    return subprocess.run(
        [nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_nginx_takes_the_cache_hosts_configuration(
    nginx: str, fixture: dict[str, Any], tmp_path: Path
) -> None:
    result = nginx_check(nginx, fixture["hosts"]["cache1"]["nginx"]["appendHttpConfig"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_refuses_a_broken_configuration(nginx: str, tmp_path: Path) -> None:
    """The check above would catch a mistake."""
    result = nginx_check(nginx, "server { listen 5080; root /x }", tmp_path)
    assert result.returncode != 0
