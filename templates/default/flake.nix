# A fleet of NixOS hosts, deployed with the fleet tool.
#
# Set `fleet.url` to the fleet repository this template came from (the
# reference you gave `nix flake init -t`), then:
#
#   nix eval .#fleet --json     # the inventory the tool reads
#   fleet deploy --dry-run      # builds every host; shows what would change
#   fleet deploy web1           # the first host, then `fleet deploy` for all
{
  description = "A fleet of NixOS hosts";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";
    fleet.url = "FLEET";
    fleet.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs =
    { nixpkgs, fleet, ... }:
    fleet.lib.mkFleet {
      inherit nixpkgs;
      modules = [ ./fleet.nix ];
    };
}
