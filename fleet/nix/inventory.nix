# The one producer of the fleet inventory (schema: fleet/inventory.schema.json,
# explained in docs/inventory.md). Both the lab flake and the fleet module call
# it, so a real fleet and the lab cannot export different shapes.
#
# It needs no nixpkgs: the lab flake has no inputs.
#
# Arguments:
#   hosts:  attrset of name -> { address; sshPort?; sshUser?; tags?; system?;
#           hostKey?; services?; checks?; secrets? }
#   deploy: partial deploy policy; missing fields take the defaults below.
#   services: attrset of name -> { dependsOn?; }: what orders the waves.
{
  hosts,
  deploy ? { },
  services ? { },
}:
let
  checkDefaults = {
    service = null;
    timeout = 5;
    interval = 1;
    retries = 30;
  };

  normaliseCheck =
    check:
    let
      base = checkDefaults // check;
    in
    if base.type == "http" then
      {
        path = "/";
        expectStatus = 200;
        expectBody = null;
      }
      // base
    else
      base;

  normaliseHost = _name: host: {
    inherit (host) address;
    sshPort = host.sshPort or 22;
    sshUser = host.sshUser or "root";
    tags = host.tags or [ ];
    system = host.system or "x86_64-linux";
    hostKey = host.hostKey or null;
    services = host.services or [ ];
    checks = map normaliseCheck (host.checks or [ ]);
    # { service; name; file; path; }: what the tool uploads before activating.
    secrets = host.secrets or [ ];
  };
in
{
  schemaVersion = 1;
  hosts = builtins.mapAttrs normaliseHost hosts;
  services = builtins.mapAttrs (_name: service: {
    dependsOn = service.dependsOn or [ ];
  }) services;
  deploy = {
    parallel = 8;
    canary = 1;
    canaryTag = "canary";
    batchSize = "25%";
    maxFailures = 0;
    healthTimeout = 60;
    confirmTimeout = 30;
  }
  // deploy;
}
