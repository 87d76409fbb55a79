# The example fleet: two application hosts running the example HTTP API, a
# data host running redis, which the API depends on, two balancers in front
# of the API and a monitoring host watching them all. The addresses are from
# a documentation range: replace them, the operator key and the host
# modules.
{ lib, pkgs, ... }:
let
  api = pkgs.callPackage ../examples/api { };
in
{
  hosts = {
    app1 = {
      address = "192.0.2.11";
      tags = [ "app" ];
      modules = [ ./common.nix ];
    };
    app2 = {
      address = "192.0.2.12";
      tags = [ "app" ];
      modules = [ ./common.nix ];
    };
    db1 = {
      address = "192.0.2.21";
      tags = [ "data" ];
      modules = [
        ./common.nix
        ./db1.nix
      ];
    };
    # HAProxy in front of the API, on port 80 of both: clients find them by
    # one DNS name with both addresses (or a floating address).
    lb1 = {
      address = "192.0.2.31";
      tags = [ "balancer" ];
      modules = [ ./common.nix ];
    };
    lb2 = {
      address = "192.0.2.32";
      tags = [ "balancer" ];
      modules = [ ./common.nix ];
    };
    # Prometheus, Alertmanager and the blackbox exporter: every host's node
    # exporter, the API's and redis's health checks, the balancers' HAProxy
    # (docs/monitoring.md). Set monitoring.webhook to be told of alerts.
    mon1 = {
      address = "192.0.2.41";
      tags = [ "monitoring" ];
      modules = [ ./common.nix ];
    };
  };

  # The key the fleet tool logs in with (see fleet.yaml's identityFile).
  authorizedKeys = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFw+9uMjv8rSCdSM9Nx4RWSHLIEMgBurxOfSqIzgeFra operator@example"
  ];

  services.api = {
    description = "example HTTP API";
    package = api;
    command = [
      (lib.getExe api)
      "--port"
      "8080"
    ];
    environment.API_VERSION = "1";
    ports = [ 8080 ];
    placement.tags = [ "app" ];
    # Its instances find redis in FLEET_REDIS_ADDRS, and its password in
    # $CREDENTIALS_DIRECTORY/redis-password: the same file of the operator's
    # secrets folder as redis's, uploaded by the fleet tool.
    dependsOn = [ "redis" ];
    secrets.redis-password = { };
    healthCheck = {
      type = "http";
      path = "/health";
      expectBody = "ok";
    };
    # Served by the balancers on port 80, checked by them as above; a
    # deploy takes one instance out of rotation at a time.
    ingress = {
      port = 80;
      mode = "http";
    };
    limits = {
      memory = "256M";
      cpu = "50%";
    };
  };

  # A service nixpkgs has a module for: the module runs it, the fleet places
  # it, opens its port to the fleet's hosts, checks it, gives it its password
  # and tells the API where it is.
  services.redis = {
    description = "redis";
    ports = [ 6379 ];
    placement.tags = [ "data" ];
    unit = "redis-main";
    # The fleet tool uploads the operator's `redis-password` file to the
    # host (root-only) and the unit loads it as a credential.
    secrets.redis-password = { };
    nixosModule =
      { config, ... }:
      {
        services.redis.servers.main = {
          enable = true;
          port = 6379;
          # The host's private address, and loopback for the health check.
          bind = "127.0.0.1 ${config.fleet.address}";
          # The unit's credential: the module's start script (run as root)
          # reads it, so the password is never in the Nix store.
          requirePassFile = "/run/credentials/redis-main.service/redis-password";
        };
      };
    healthCheck.type = "tcp";
    limits.memory = "512M";
  };

  deploy = {
    canary = 1;
    batchSize = 1;
    healthTimeout = 90;
  };
}
