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
#   traffic: null, or the services the balancers serve:
#           { agentPort?; drainTimeout?; socket?; balancers;
#             services = name -> { port; mode?; maxUnavailable?;
#                                  instances = host -> { address; port; };
#                                  check?; }; }
#           maxUnavailable may be a share ("25%"): it is resolved here against
#           the number of instances.
{
  hosts,
  deploy ? { },
  services ? { },
  traffic ? null,
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

  # A share of the instances, rounded down, but at least one: a deploy must
  # be able to take some instance out of rotation.
  resolveMaxUnavailable =
    count: value:
    let
      share = builtins.match "([0-9]+)%" (toString value);
      n = if share == null then value else count * builtins.fromJSON (builtins.head share) / 100;
    in
    if n < 1 then 1 else n;

  normaliseBalanced =
    _name: service:
    let
      instances = builtins.mapAttrs (_host: instance: {
        inherit (instance) address port;
      }) (service.instances or { });
    in
    {
      inherit (service) port;
      mode = service.mode or "http";
      maxUnavailable = resolveMaxUnavailable (builtins.length (builtins.attrNames instances)) (
        service.maxUnavailable or 1
      );
      inherit instances;
      check = if service.check or null == null then null else normaliseCheck service.check;
    };

  normaliseTraffic = traffic: {
    agentPort = traffic.agentPort or 9777;
    drainTimeout = traffic.drainTimeout or 30;
    # HAProxy's runtime API: a root-only unix socket, never a network port.
    socket = traffic.socket or "/run/haproxy/admin.sock";
    balancers = builtins.sort builtins.lessThan (traffic.balancers or [ ]);
    services = builtins.mapAttrs normaliseBalanced traffic.services;
  };

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
  traffic =
    if traffic == null || (traffic.services or { }) == { } then null else normaliseTraffic traffic;
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
