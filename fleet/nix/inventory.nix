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
#           Its `analysis` (name -> { query? | successRate? | latency?;
#           service?; interval?; count?; successCondition?; failureLimit?;
#           inconclusiveLimit?; }) becomes a list sorted by name, each
#           template rendered into its query and condition.
#   services: attrset of name -> { dependsOn?; }: what orders the waves.
#   traffic: null, or the services the balancers serve:
#           { agentPort?; drainTimeout?; socket?; balancers;
#             services = name -> { port; mode?; maxUnavailable?;
#                                  instances = host -> { address; port; };
#                                  check?; }; }
#           maxUnavailable may be a share ("25%"): it is resolved here against
#           the number of instances.
#   monitoring: null, or the hosts that watch the fleet with Prometheus:
#           { servers; prometheusPort?; alertmanagerPort?; blackboxPort?;
#             nodeExporterPort?; haproxyPort?; scrapeInterval?; webhook?;
#             metrics? = service -> { port; path?; }; }
#           What they scrape comes from the hosts (every host's node
#           exporter, the instances of each service with `metrics`, every
#           HTTP and TCP check of a service) and from `traffic` (the
#           balancers' HAProxy exporter).
#   cache:  null, or the fleet's binary cache: { server; port?; publicKey;
#           directory?; }: the host that serves it over HTTP, and the key it
#           signs with, which every host trusts.
{
  hosts,
  deploy ? { },
  services ? { },
  traffic ? null,
  monitoring ? null,
  cache ? null,
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
    # HAProxy's own Prometheus exporter on every balancer, when the fleet
    # has monitoring hosts to scrape it.
    metricsPort = if normalisedMonitoring == null then null else normalisedMonitoring.haproxyPort;
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

  normalisedHosts = builtins.mapAttrs normaliseHost hosts;
  hostNames = builtins.attrNames normalisedHosts;

  normalisedTraffic =
    if traffic == null || (traffic.services or { }) == { } then null else normaliseTraffic traffic;

  unique = builtins.foldl' (seen: x: if builtins.elem x seen then seen else seen ++ [ x ]) [ ];

  # What the monitoring hosts probe through their blackbox exporter: a
  # service's HTTP and TCP checks. A command check runs on its own host only.
  probed = check: check.service != null && (check.type == "http" || check.type == "tcp");

  normaliseMonitoring =
    monitoring:
    let
      metrics = monitoring.metrics or { };
      runs =
        service: builtins.filter (h: builtins.elem service normalisedHosts.${h}.services) hostNames;
      endpoints =
        service:
        builtins.listToAttrs (
          map (host: {
            name = host;
            value = {
              inherit (normalisedHosts.${host}) address;
              inherit (metrics.${service}) port;
              path = metrics.${service}.path or "/metrics";
            };
          }) (runs service)
        );
      checksOf =
        service: host:
        builtins.filter (c: probed c && c.service == service) normalisedHosts.${host}.checks;
      # A host's first check of the service (a fleet declares one).
      probes =
        service:
        builtins.listToAttrs (
          builtins.concatMap (
            host:
            map (check: {
              name = host;
              value = {
                inherit (normalisedHosts.${host}) address;
                inherit check;
              };
            }) (checksOf service host)
          ) hostNames
        );
      probedServices = builtins.concatMap (
        host: map (c: c.service) (builtins.filter probed normalisedHosts.${host}.checks)
      ) hostNames;
      watched = unique (builtins.attrNames metrics ++ probedServices);
    in
    {
      servers = builtins.sort builtins.lessThan monitoring.servers;
      prometheusPort = monitoring.prometheusPort or 9090;
      alertmanagerPort = monitoring.alertmanagerPort or 9093;
      blackboxPort = monitoring.blackboxPort or 9115;
      nodeExporterPort = monitoring.nodeExporterPort or 9100;
      haproxyPort = monitoring.haproxyPort or 8405;
      scrapeInterval = monitoring.scrapeInterval or "15s";
      webhook = monitoring.webhook or null;
      # The node exporter's textfile collector reads the fleet's metrics here.
      textfileDirectory = "/var/lib/fleet-metrics";
      nodes = builtins.mapAttrs (_host: host: { inherit (host) address tags; }) normalisedHosts;
      services = builtins.listToAttrs (
        map (service: {
          name = service;
          value = {
            metrics = if metrics ? ${service} then endpoints service else { };
            probes = probes service;
          };
        }) watched
      );
      balancers = if normalisedTraffic == null then [ ] else normalisedTraffic.balancers;
    };

  normalisedMonitoring =
    if monitoring == null || (monitoring.servers or [ ]) == [ ] then
      null
    else
      normaliseMonitoring monitoring;

  # Canary analysis templates, in the spirit of Flagger's: the share of the
  # canaries' responses that are not 5xx, from HAProxy's own counters per
  # server (no instrumentation of the service), and a quantile of the
  # service's own latency histogram. The names in them are checked names
  # (services, metrics), safe between PromQL's quotes.
  responses =
    service: codes:
    ''haproxy_server_http_responses_total{job="haproxy",proxy="${service}",server=~"{{hosts}}"${codes}}'';

  successRate =
    t:
    let
      window = t.window or "1m";
    in
    {
      query =
        "sum(rate(${responses t.service '',code!="5xx"''}[${window}]))"
        + " / sum(rate(${responses t.service ""}[${window}]))";
      condition = "result >= ${builtins.toJSON (t.min or 0.99)}";
      inherit (t) service;
    };

  latency =
    t:
    let
      window = t.window or "1m";
      buckets = ''${t.histogram}_bucket{job="fleet-service",host=~"{{hosts}}"}'';
    in
    {
      query = "histogram_quantile(${builtins.toJSON (t.quantile or 0.99)}, sum by (le) (rate(${buckets}[${window}])))";
      condition = "result <= ${builtins.toJSON t.maxSeconds}";
      service = null;
    };

  normaliseAnalysis =
    name: a:
    let
      rendered =
        if a.successRate or null != null then
          successRate a.successRate
        else if a.latency or null != null then
          latency a.latency
        else
          {
            inherit (a) query;
            condition = "result >= 0.99";
            service = null;
          };
      given = field: fallback: if a.${field} or null != null then a.${field} else fallback;
    in
    {
      inherit name;
      inherit (rendered) query;
      service = given "service" rendered.service;
      interval = given "interval" 10;
      count = given "count" 3;
      successCondition = given "successCondition" rendered.condition;
      failureLimit = given "failureLimit" 0;
      inconclusiveLimit = given "inconclusiveLimit" 0;
    };

  # The binary cache: the tool pushes each new closure to it once, and every host
  # fetches what it lacks from it over HTTP.
  normalisedCache =
    if cache == null || (cache.server or null) == null then
      null
    else
      let
        inherit (normalisedHosts.${cache.server}) address;
        port = cache.port or 5080;
        bracketed = if builtins.match ".*:.*" address != null then "[${address}]" else address;
      in
      {
        host = cache.server;
        inherit address port;
        url = "http://${bracketed}:${toString port}";
        inherit (cache) publicKey;
        directory = cache.directory or "/var/lib/fleet-cache";
      };

  # attrNames is sorted: the list is in the order of the names.
  analyses = builtins.attrValues (builtins.mapAttrs normaliseAnalysis (deploy.analysis or { }));
in
{
  schemaVersion = 1;
  hosts = normalisedHosts;
  services = builtins.mapAttrs (_name: service: {
    dependsOn = service.dependsOn or [ ];
  }) services;
  traffic = normalisedTraffic;
  monitoring = normalisedMonitoring;
  cache = normalisedCache;
  deploy = {
    parallel = 8;
    canary = 1;
    canaryTag = "canary";
    batchSize = "25%";
    maxFailures = 0;
    healthTimeout = 60;
    confirmTimeout = 30;
  }
  // deploy
  // {
    analysis = analyses;
  };
}
