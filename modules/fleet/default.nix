# The fleet-level module: a fleet declaration in, per-host NixOS modules and
# the inventory out. Evaluate it with ../eval.nix; it needs nixpkgs' `lib`
# only.
{ config, lib, ... }:
let
  inherit (lib) mkOption types;

  fleetLib = import ../lib.nix { inherit lib; };
  plan = import ./plan.nix { inherit lib fleetLib; } config;

  result =
    description:
    mkOption {
      type = types.raw;
      readOnly = true;
      inherit description;
    };
in
{
  imports = [ ./options.nix ];

  options.build = {
    inventory = result ''
      The inventory the fleet tool reads (`nix eval --json FLAKE#fleet`),
      made by the one producer, fleet/nix/inventory.nix.
    '';
    placement = result "Service name to the sorted names of the hosts that run it.";
    services = result "Service name to its hosts, its addresses and the addresses of its dependencies.";
    hosts = result ''
      Host name to `{ system; plan; modules; }`: `plan` is the host's
      `fleet` configuration and `modules` the full list of NixOS modules of
      the host (the fleet host module, the plan, the host's own modules and
      those of the services placed on it).
    '';
    problems = result "The declaration's problems; every other result fails to evaluate unless it is empty.";
  };

  config.build = {
    inherit (plan)
      inventory
      placement
      services
      hosts
      problems
      ;
  };
}
