# Evaluates a fleet declaration with nixpkgs' `lib` alone:
#
#   import ./modules/eval.nix { inherit lib; } {
#     modules = [ ./fleet.nix ];
#     specialArgs = { inherit pkgs; };  # if the declaration names packages
#   }
#
# gives the usual `evalModules` result; its `config.build` holds the results.
{ lib }:
{
  modules,
  specialArgs ? { },
}:
lib.evalModules {
  class = "fleet";
  modules = [ ./fleet ] ++ modules;
  inherit specialArgs;
}
