# The fleets the VM tests deploy: one declaration per layout of machines and
# per release of the example API. Apart from ./default.nix so that the fast
# Nix tests (tests/nix/test_nix_vm.py) evaluate them, and the balancer's
# haproxy.cfg, with nixpkgs' `lib` alone.
{ lib, api }:
let
  keys = import ./keys.nix;
  evalFleet = import ../../modules/eval.nix { inherit lib; };
in
rec {
  targets = [
    "target1"
    "target2"
  ];

  # Each layout's fleet hosts besides the targets, with their tag. `plain`: a
  # deployer and the targets. `balanced`: the same behind a balancer, which
  # the fleet configures (HAProxy, from the declaration). `monitored`: the
  # same watched by a monitoring host (Prometheus, Alertmanager, blackbox).
  # `cached`: the same with a binary cache host, which the targets fetch
  # each release from.
  layouts = {
    plain = { };
    balanced.balancer = "balancer";
    monitored.monitor = "monitoring";
    cached.cache = "cache";
  };

  # Every machine of a layout's test, and those of them that are fleet hosts.
  extras = layout: lib.attrNames layouts.${layout};
  machines = layout: [ "deployer" ] ++ targets ++ extras layout;
  fleetHosts = layout: targets ++ extras layout;

  # The address the test driver gives a machine (nixos/lib/testing/network.nix):
  # 192.168.1.N, N its place among the test's machine names in order. The
  # firewall matches addresses, not names: the balancer reaches the targets'
  # ports and agents because the fleet knows them by these. Every machine
  # asserts its own (./default.nix), so a driver that numbers otherwise fails
  # at evaluation, not with a timeout.
  address =
    layout: name:
    let
      numbers = lib.listToAttrs (
        lib.imap1 (n: machine: lib.nameValuePair machine n) (
          lib.attrNames (lib.genAttrs (machines layout) (_: null))
        )
      );
    in
    "192.168.1.${toString numbers.${name}}";

  # The API's releases. `unhealthy` starts but fails its health check (it is
  # pointed at a redis that is not there); `slow` takes a while to activate,
  # long enough to cut the link in the middle.
  releases = {
    v1 = { };
    v2 = { };
    v3 = { };
    unhealthy.environment.FLEET_REDIS_ADDRS = "127.0.0.1:9";
    slow.activationDelay = 10;
  };

  # The API's frontend on the balancer.
  ingressPort = 80;

  declaration = layout: release: {
    hosts =
      lib.genAttrs targets (name: {
        address = address layout name;
        tags = [ "app" ];
        hostKey = keys.${name}.public;
      })
      // lib.mapAttrs (name: tag: {
        address = address layout name;
        tags = [ tag ];
        hostKey = keys.${name}.public;
      }) layouts.${layout};
    authorizedKeys = [ keys.operator.public ];
    services.api = {
      package = api;
      command = [
        (lib.getExe api)
        "--port"
        "8080"
      ];
      environment = {
        API_VERSION = release;
      }
      // releases.${release}.environment or { };
      ports = [ 8080 ];
      placement.tags = [ "app" ];
      # allowFrom stays the default: the fleet's hosts (and the balancers,
      # for a service behind them). The deployer is not one of them.
      # A secret already on the host, as agenix leaves one (fleetTestSecret).
      secrets.api-token.path = "/run/fleet-test/api-token";
      healthCheck = {
        type = "http";
        path = "/health";
        expectBody = "ok";
        timeout = 2;
        retries = 10;
      };
      ingress = lib.mkIf (layout == "balanced") {
        port = ingressPort;
        mode = "http";
        # One target at a time out of rotation: the other serves.
        maxUnavailable = 1;
      };
    };
    # The dead-man switch fires at activation + health + confirm timeouts;
    # a confirm timeout above the health timeout leaves the tool's own restore
    # after a failed check well clear of it (tests/nix/test_nix_vm.py).
    deploy = {
      healthTimeout = 30;
      confirmTimeout = 60;
    };
    traffic.drainTimeout = 10;
    # The cache host signs what it publishes with the test key, which every
    # host trusts; the secret half is put on it at boot (./default.nix).
    cache = lib.mkIf (layout == "cached") { publicKey = keys.binaryCache.public; };
  };

  fleets = lib.mapAttrs (
    layout: _:
    lib.mapAttrs (release: _: evalFleet { modules = [ (declaration layout release) ]; }) releases
  ) layouts;
}
