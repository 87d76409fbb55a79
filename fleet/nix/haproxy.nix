# The whole haproxy.cfg of the fleet's balancers, from the inventory's
# `traffic` (docs/inventory.md): one frontend and one backend per service,
# one server per instance, each checked as the service declares and asked
# by the host's fleet agent whether to stay in rotation; and, when the fleet
# has monitoring hosts (`metricsPort`), HAProxy's own Prometheus exporter.
# The host module and the lab's flake both use it, so a real fleet's
# balancers and the lab's are configured alike.
#
# It needs no nixpkgs: the lab's flake has no inputs.
#
# HAProxy cuts lines into words much as a shell does. Every word that comes
# from the declaration is either held to a pattern (names, addresses, the
# socket's path) or written in double quotes with `\`, `"`, `$` and control
# characters escaped (a check's path and expected body); anything else
# aborts the evaluation rather than reach the file.
traffic:
let
  inherit (builtins)
    attrNames
    concatStringsSep
    fromJSON
    genList
    replaceStrings
    toJSON
    ;

  checked = import ./checked.nix {
    generator = "haproxy.nix";
    file = "haproxy.cfg";
  };
  inherit (checked)
    refuse
    matching
    name
    address
    port
    hostPort
    requestPath
    ;
  hex = checked.hex2;

  # The control characters a Nix string can hold (not NUL), as HAProxy's \xNN.
  codes = genList (i: i + 1) 31 ++ [ 127 ];
  controls = map (n: fromJSON ''"\u00${hex n}"'') codes;

  # A word within weak quotes: `\` and `"` escaped, `$` too (it would name
  # an environment variable there), control characters as \xNN.
  quote =
    s:
    ''"''
    + replaceStrings ([ "\\" ''"'' "$" ] ++ controls) (
      [ "\\\\" ''\"'' "\\$" ] ++ map (n: "\\x${hex n}") codes
    ) s
    + ''"'';

  milliseconds = seconds: "${toString (builtins.ceil (seconds * 1000))}ms";

  lines = concatStringsSep "\n";
  indent = map (l: "  " + l);

  frontend =
    service: s:
    [
      "frontend ${service}"
      "  mode ${s.mode}"
      "  bind :${port "ingress port" s.port}"
    ]
    ++ indent (
      if s.mode == "http" then
        [
          "option httplog"
          "option forwardfor"
        ]
      else
        [ "option tcplog" ]
    )
    ++ [ "  default_backend ${service}" ];

  # HAProxy's own check follows the service's: an HTTP request, else a
  # connection (a command check cannot be run from a balancer).
  probes = check: check != null && (check.type == "http" || check.type == "tcp");

  checkLines =
    check:
    if check != null && check.type == "http" then
      [
        "option httpchk"
        "http-check send meth GET uri ${quote (requestPath check.path)}"
        "http-check expect status ${toString check.expectStatus}"
      ]
      ++ (
        if check.expectBody == null then
          [ ]
        else
          [ "http-check expect string ${quote check.expectBody}" ]
      )
      ++ [ "timeout check ${milliseconds check.timeout}" ]
    else if probes check then
      [ "timeout check ${milliseconds check.timeout}" ]
    else
      [ ];

  server =
    service: s: host:
    let
      instance = s.instances.${host};
      # The check's port when it is not the one traffic goes to.
      checkPort =
        if probes s.check && s.check.port != instance.port then
          " port ${port "health check port" s.check.port}"
        else
          "";
    in
    "server ${name "host name" host} ${hostPort instance.address instance.port} check${checkPort}"
    + " inter 1s fall 2 rise 2 weight 100"
    # The host's agent answers "ready 100%", "ready NN%" or "drain" for the
    # service named on its one line.
    + " agent-check agent-port ${port "agent port" traffic.agentPort} agent-inter 1s"
    + " agent-send \"${service}\\n\"";

  backend =
    service: s:
    [
      "backend ${service}"
      "  mode ${s.mode}"
      "  balance roundrobin"
    ]
    ++ indent (
      # A request an instance refused, dropped or let time out goes to
      # another one.
      (
        if s.mode == "http" then [ "retry-on conn-failure empty-response response-timeout" ] else [ ]
      )
      ++ checkLines s.check
      ++ map (server service s) (attrNames s.instances)
    );

  mode =
    service: m:
    if m == "http" || m == "tcp" then m else refuse "mode of service ${toJSON service}" m;

  # In HAProxy's runtime directory: the only place fleet-host reads a socket.
  socket = matching "/run/haproxy/[A-Za-z0-9][A-Za-z0-9_.-]*[.]sock" "socket path" traffic.socket;

  proxies =
    service:
    let
      declared = traffic.services.${service};
      checked = name "service name" service;
      s = declared // {
        mode = mode service declared.mode;
      };
    in
    [ "" ] ++ frontend checked s ++ [ "" ] ++ backend checked s;

  # HAProxy's Prometheus exporter, for the monitoring hosts (the firewall
  # lets no one else reach the port). Its name starts with `_`, which no
  # service's can, so that it never clashes with a service's frontend.
  metrics =
    let
      metricsPort = traffic.metricsPort or null;
    in
    if metricsPort == null then
      [ ]
    else
      [
        ""
        "frontend _prometheus"
        "  mode http"
        "  bind :${port "metrics port" metricsPort}"
        "  http-request use-service prometheus-exporter if { path /metrics }"
        "  no log"
      ];
in
lines (
  [
    "# Generated by fleet (fleet/nix/haproxy.nix) from the fleet's traffic."
    "global"
    # The runtime API, with which deploys drain instances: a unix socket
    # only root reaches, never a network port.
    "  stats socket ${socket} mode 600 level admin"
    "  stats timeout 30s"
    # Each connection takes two file descriptors (client, server): 4096 stay
    # within the limits of services and containers.
    "  maxconn 4096"
    # To the service manager's journal, under systemd.
    "  log stdout format short local0 info"
    ""
    "defaults"
    "  log global"
    "  option dontlognull"
    "  timeout connect 2s"
    "  timeout client 30s"
    "  timeout server 30s"
    "  timeout http-request 10s"
    "  timeout check 2s"
    "  retries 3"
    "  option redispatch 1"
    # An instance whose name does not resolve is down, not a balancer that
    # does not start.
    "  default-server init-addr last,libc,none"
  ]
  ++ builtins.concatMap proxies (attrNames traffic.services)
  ++ metrics
)
+ "\n"
