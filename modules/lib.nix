# Pure helpers shared by the fleet-level module (./fleet) and the host module
# (./host.nix). They need nixpkgs' `lib` only.
{ lib }:
let
  inherit (lib)
    concatStringsSep
    hasInfix
    head
    replaceStrings
    toUpper
    ;

  # The one producer of the inventory the fleet tool reads.
  produceInventory = import ../fleet/nix/inventory.nix;

  # The producer fills defaults; read them back from it so that no option
  # below restates them.
  probe = produceInventory {
    hosts.probe = {
      address = "probe";
      checks = [
        {
          name = "probe";
          type = "http";
          port = 1;
        }
      ];
    };
  };

  primaryPort = service: if service.ports == [ ] then null else head service.ports;
in
{
  inherit produceInventory primaryPort;

  defaults = {
    host = removeAttrs probe.hosts.probe [
      "address"
      "checks"
      "services"
    ];
    check = removeAttrs (head probe.hosts.probe.checks) [
      "name"
      "service"
      "type"
      "port"
    ];
    inherit (probe) deploy;
  };

  # Host, service, tag and check names: the inventory schema's name pattern.
  namePattern = "[A-Za-z0-9][A-Za-z0-9_.-]{0,62}";

  # "address:port", with brackets around IPv6 addresses.
  hostPort =
    address: port:
    if hasInfix ":" address then "[${address}]:${toString port}" else "${address}:${toString port}";

  # The environment variable that lists a dependency's instances.
  addrsVariable =
    service: "FLEET_${toUpper (replaceStrings [ "-" "." ] [ "_" "_" ] service)}_ADDRS";

  # systemd's quoting for one Exec argument: a C-style string in which `%`
  # and `$` stay literal.
  escapeExecArgs =
    args:
    concatStringsSep " " (
      map (arg: replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg)) args
    );

  # The inventory record of a service's health check, or null without one.
  # HTTP and TCP checks default to the service's first port.
  checkOf =
    name: service:
    let
      check = service.healthCheck;
      common = {
        inherit name;
        service = name;
        inherit (check)
          type
          timeout
          interval
          retries
          ;
      };
      port = if check.port != null then check.port else primaryPort service;
    in
    if check == null then
      null
    else if check.type == "http" then
      common
      // {
        inherit port;
        inherit (check) path expectStatus expectBody;
      }
    else if check.type == "tcp" then
      common // { inherit port; }
    else
      common // { inherit (check) command; };
}
