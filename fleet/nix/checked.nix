# What the generators (haproxy.nix, prometheus.nix) let from the inventory
# into a file they write: names, addresses, ports and paths held to the
# shapes the inventory gives them, and characters as hexadecimal escapes.
# Anything else aborts the evaluation, naming the generator and its file.
#
#   import ./checked.nix { generator = "haproxy.nix"; file = "haproxy.cfg"; }
#
# It needs no nixpkgs: the lab's flake has no inputs.
{ generator, file }:
let
  inherit (builtins)
    isInt
    isString
    match
    substring
    toJSON
    ;
in
rec {
  refuse =
    what: value:
    throw "fleet/nix/${generator}: ${what} ${toJSON value} cannot be written in ${file}";

  matching =
    pattern: what: value:
    if isString value && match pattern value != null then value else refuse what value;

  # Host, service, tag and check names, as the inventory has them.
  name = matching "[A-Za-z0-9][A-Za-z0-9_.-]*";
  # A DNS name or a bare IPv4 or IPv6 address, as the inventory has them.
  address = matching "[A-Za-z0-9:][A-Za-z0-9.:-]*" "address";
  port =
    what: value:
    if isInt value && value >= 1 && value <= 65535 then toString value else refuse what value;

  # "address:port", with brackets around an IPv6 address.
  hostPort =
    a: p:
    let
      host = if match ".*:.*" a != null then "[${address a}]" else address a;
    in
    "${host}:${port "port" p}";

  # A request target: printable ASCII without spaces (the declaration asks
  # for percent-encoding).
  requestPath = matching "/[!-~]*" "health check path";

  # Two and four hexadecimal digits of a number.
  hex2 =
    let
      digits = "0123456789abcdef";
    in
    n: substring (n / 16) 1 digits + substring (n - n / 16 * 16) 1 digits;
  hex4 = n: hex2 (n / 256) + hex2 (n - n / 256 * 256);
}
