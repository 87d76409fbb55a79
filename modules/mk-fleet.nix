# Flake outputs from a fleet declaration:
#
#   outputs = { nixpkgs, fleet, ... }:
#     fleet.lib.mkFleet { inherit nixpkgs; modules = [ ./fleet.nix ]; };
#
# gives `fleet` (the inventory the fleet tool reads) and one
# `nixosConfigurations.<host>` per host. The declaration's modules get `pkgs`,
# nixpkgs for the host's system when a host's configuration is built.
{
  nixpkgs,
  modules,
  specialArgs ? { },
}:
let
  inherit (nixpkgs) lib;

  evalFor =
    system:
    import ./eval.nix { inherit lib; } {
      inherit modules;
      specialArgs = {
        pkgs = nixpkgs.legacyPackages.${system};
      }
      // specialArgs;
    };

  # Hosts, placement and the inventory do not depend on packages, so any
  # system's evaluation gives them.
  declared = evalFor "x86_64-linux";
  perSystem = lib.genAttrs (lib.unique (
    lib.mapAttrsToList (_: host: host.system) declared.config.hosts
  )) evalFor;
in
{
  fleet = declared.config.build.inventory;

  nixosConfigurations = lib.mapAttrs (
    name: host:
    lib.nixosSystem {
      inherit (perSystem.${host.system}.config.build.hosts.${name}) modules;
    }
  ) declared.config.hosts;

  # The evaluated declaration, for `nix repl` and for checks.
  fleetEval = declared;
}
