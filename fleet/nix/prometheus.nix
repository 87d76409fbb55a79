# The monitoring hosts' configuration, from the inventory's `monitoring`
# (docs/inventory.md, docs/monitoring.md): Prometheus's prometheus.yml and
# its rules, Alertmanager's alertmanager.yml and the blackbox exporter's
# blackbox.yml. The host module and the lab's flake both use it, so a real
# fleet's monitoring hosts and the lab's are configured alike.
#
# It needs no nixpkgs: the lab's flake has no inputs.
#
#   import ./prometheus.nix { monitoring; server; }
#
# `server` is the monitoring host the files are for: its name labels
# Prometheus's and Alertmanager's own targets. The result is
# { prometheus; rules; rulesFile; alertmanager; blackbox; }: the texts of
# the four files, and `rulesFile`, the store path of `rules`, which
# prometheus.yml names (so that `promtool check config` reads both).
#
# Every file is JSON, which YAML reads as it is: builtins.toJSON quotes
# every value, so none can change a file's structure. Values are still held
# to patterns where a program would read them otherwise than meant (names,
# addresses, ports, paths, durations, the webhook's URL; `$` never reaches
# alertmanager.yml, which NixOS passes through envsubst), and an expected
# body becomes a regular expression with its metacharacters and its control
# characters escaped. Anything else aborts the evaluation rather than reach
# a file.
{ monitoring, server }:
let
  inherit (builtins)
    all
    attrNames
    ceil
    concatMap
    concatStringsSep
    elem
    filter
    fromJSON
    genList
    head
    isFloat
    isInt
    isString
    listToAttrs
    match
    replaceStrings
    toFile
    toJSON
    ;

  m = monitoring;

  checked = import ./checked.nix {
    generator = "prometheus.nix";
    file = "the monitoring configuration";
  };
  inherit (checked)
    refuse
    matching
    name
    address
    port
    hostPort
    requestPath
    hex4
    ;

  loopback = p: "127.0.0.1:${port "port" p}";

  # A Prometheus duration; a check's seconds in whole milliseconds.
  interval = matching "[1-9][0-9]*(ms|s|m|h)" "scrape interval" m.scrapeInterval;
  milliseconds =
    seconds:
    if (isInt seconds || isFloat seconds) && seconds > 0 then
      "${toString (ceil (seconds * 1000))}ms"
    else
      refuse "check timeout" seconds;

  # What Prometheus requests: printable ASCII without spaces (requestPath);
  # a metrics path without a query or a fragment.
  metricsPath =
    path:
    if isString path && match "/[!-~]*" path != null && match ".*[?#].*" path == null then
      path
    else
      refuse "metrics path" path;

  # http(s), and no `$`: NixOS's alertmanager module substitutes
  # environment variables in the file.
  webhook =
    if m.webhook == null then
      null
    else
      matching "https?://[]A-Za-z0-9._~:/?#[@!&'()*+,;=%-]+" "webhook URL" m.webhook;

  # The monitoring host these files are for.
  thisServer =
    if elem server m.servers then name "server" server else refuse "monitoring server" server;

  node =
    host:
    m.nodes.${name "host name" host} or (refuse "host (not among the monitoring's nodes)" host);

  # `,web,canary,`: a target's tags between commas, so that `.*,web,.*`
  # matches a tag, whatever its place.
  tagsLabel = tags: "," + concatStringsSep "" (map (tag: name "tag" tag + ",") tags);

  # What every target is labelled with: its host and the host's tags.
  hostLabels = host: {
    host = name "host name" host;
    tags = tagsLabel (node host).tags;
  };

  # An expected body as a regular expression (RE2, which the blackbox
  # exporter runs unanchored: the body contains it): metacharacters
  # escaped; the characters YAML forbids in a file (control characters,
  # DEL, the C1 controls, U+FFFE and U+FFFF) as \x{....} escapes.
  metacharacters = [
    "\\"
    "."
    "+"
    "*"
    "?"
    "("
    ")"
    "|"
    "["
    "]"
    "{"
    "}"
    "^"
    "$"
  ];
  unsafe =
    genList (i: i + 1) 31
    ++ genList (i: i + 127) 33
    ++ [
      65534
      65535
    ];
  character = n: fromJSON ''"\u${hex4 n}"'';
  literal = replaceStrings (metacharacters ++ map character unsafe) (
    map (c: "\\" + c) metacharacters ++ map (n: "\\x{${hex4 n}}") unsafe
  );

  serviceNames = attrNames m.services;
  probesOf = service: m.services.${service}.probes;
  probed = filter (service: probesOf service != { }) serviceNames;

  # One blackbox module per service, named after it, from its declared
  # check (every instance has the same).
  checkOf =
    service:
    let
      checks = map (host: (probesOf service).${host}.check) (attrNames (probesOf service));
      check = head checks;
    in
    if !(all (c: c == check) checks) then
      refuse "service (its instances declare different checks)" service
    else if check.type == "http" || check.type == "tcp" then
      check
    else
      refuse "check type (only HTTP and TCP checks can be probed from elsewhere)" check.type;

  status =
    value:
    if isInt value && value >= 100 && value <= 599 then value else refuse "expected status" value;

  moduleOf =
    service:
    let
      check = checkOf service;
    in
    if check.type == "http" then
      {
        prober = "http";
        timeout = milliseconds check.timeout;
        http = {
          method = "GET";
          valid_status_codes = [ (status check.expectStatus) ];
          # As the fleet tool's own check: the answer of the path itself.
          follow_redirects = false;
        }
        // (
          if check.expectBody == null then
            { }
          else
            { fail_if_body_not_matches_regexp = [ (literal check.expectBody) ]; }
        );
      }
    else
      {
        prober = "tcp";
        timeout = milliseconds check.timeout;
      };

  # What the blackbox exporter is asked to probe: the URL of an HTTP check,
  # the address of a TCP one.
  probeTarget =
    probe:
    if probe.check.type == "http" then
      "http://${hostPort probe.address probe.check.port}${requestPath probe.check.path}"
    else
      hostPort probe.address probe.check.port;

  job =
    jobName: extra: groups:
    if groups == [ ] then
      [ ]
    else
      [
        (
          {
            job_name = jobName;
            static_configs = groups;
          }
          // extra
        )
      ];

  nodeJob = job "node" { } (
    map (host: {
      targets = [ (hostPort (node host).address m.nodeExporterPort) ];
      labels = hostLabels host;
    }) (attrNames m.nodes)
  );

  serviceJob = job "fleet-service" { } (
    concatMap (
      service:
      let
        endpoints = m.services.${service}.metrics;
      in
      map (
        host:
        let
          endpoint = endpoints.${host};
        in
        {
          targets = [ (hostPort endpoint.address endpoint.port) ];
          labels = hostLabels host // {
            service = name "service name" service;
            # The service's own path, for this target alone.
            __metrics_path__ = metricsPath endpoint.path;
          };
        }
      ) (attrNames endpoints)
    ) serviceNames
  );

  # Each instance's check, through the local blackbox exporter: the target
  # is the exporter, and the instance, the module and the probed URL are
  # the target's labels (`__param_*` become the request's parameters).
  healthJob = job "fleet-health" { metrics_path = "/probe"; } (
    concatMap (
      service:
      map (
        host:
        let
          probe = (probesOf service).${host};
        in
        {
          targets = [ (loopback m.blackboxPort) ];
          labels = hostLabels host // {
            service = name "service name" service;
            instance = hostPort probe.address probe.check.port;
            __param_module = service;
            __param_target = probeTarget probe;
          };
        }
      ) (attrNames (probesOf service))
    ) probed
  );

  haproxyJob = job "haproxy" { } (
    map (host: {
      targets = [ (hostPort (node host).address m.haproxyPort) ];
      labels = hostLabels host;
    }) m.balancers
  );

  ownJob =
    jobName: p:
    job jobName { } [
      {
        targets = [ (loopback p) ];
        labels = hostLabels thisServer;
      }
    ];

  # The deploy state every host exports (fleet-host metrics, in the node
  # exporter's textfile), joined with what is scraped. The release is no
  # target label: it changes with every deploy, and a label written at build
  # time would go stale; each host's own fleet_release_info says it.
  recordings = [
    {
      record = "fleet:up:release";
      expr = "up * on(host) group_left(release) fleet_release_info";
    }
    {
      record = "fleet:probe_success:release";
      expr = "probe_success * on(host) group_left(release) fleet_release_info";
    }
    {
      record = "fleet:release:hosts";
      expr = "count by (release) (fleet_release_info)";
    }
    {
      record = "fleet:release:latest";
      expr = latestRelease;
    }
  ];

  # The fleet's last release: that of the newest record of a deploy that
  # succeeded. A host is behind when its own newest record is a successful
  # deploy of another release: the hosts of one rollout write their records
  # minutes apart, so comparing the times alone would flag all but the last.
  latestRelease = ''fleet_release_info{result="deployed"} and on(host) (fleet_release_timestamp_seconds == on() group_left() max(fleet_release_timestamp_seconds and on(host) fleet_release_info{result="deployed"}))'';

  alert =
    {
      alertname,
      expr,
      for ? null,
      severity,
      summary,
      description,
    }:
    {
      alert = alertname;
      inherit expr;
      labels = { inherit severity; };
      annotations = { inherit summary description; };
    }
    // (if for == null then { } else { inherit for; });

  alerts = map alert [
    {
      alertname = "FleetHostDown";
      expr = ''up{job="node"} == 0'';
      for = "2m";
      severity = "critical";
      summary = "Host {{ $labels.host }} is down";
      description = "The node exporter of host {{ $labels.host }} ({{ $labels.instance }}) has not answered for 2 minutes: the host, its network or the exporter is down.";
    }
    {
      alertname = "FleetUnitFailed";
      expr = ''node_systemd_unit_state{state="failed"} == 1'';
      for = "2m";
      severity = "warning";
      summary = "Unit {{ $labels.name }} failed on {{ $labels.host }}";
      description = "systemd unit {{ $labels.name }} on host {{ $labels.host }} has been in the failed state for 2 minutes.";
    }
    {
      alertname = "FleetHealthCheckFailing";
      expr = ''probe_success{job="fleet-health"} == 0'';
      for = "2m";
      severity = "critical";
      summary = "Health check of {{ $labels.service }} failing on {{ $labels.host }}";
      description = "The declared health check of service {{ $labels.service }} on host {{ $labels.host }} ({{ $labels.instance }}) has failed for 2 minutes, probed from the monitoring host.";
    }
    {
      alertname = "FleetGenerationDrift";
      expr = "fleet_generation_drift == 1";
      for = "10m";
      severity = "warning";
      summary = "{{ $labels.host }} does not run its profile's current generation";
      description = "Host {{ $labels.host }} has run a system other than its system profile's current generation for 10 minutes: a deploy under way, a --boot deploy awaiting its reboot, or a change by hand.";
    }
    {
      alertname = "FleetReleaseBehind";
      expr = ''fleet_release_info{result="deployed"} unless on(release) (${latestRelease})'';
      for = "30m";
      severity = "warning";
      summary = "{{ $labels.host }} is not on the fleet's last release";
      description = "Host {{ $labels.host }} runs release {{ $labels.release }}, not the release of the fleet's newest successful deploy, and has for 30 minutes.";
    }
    {
      alertname = "FleetLockHeldTooLong";
      expr = "fleet_lock_held_seconds > 900";
      severity = "warning";
      summary = "Deploy lock held on {{ $labels.host }} for {{ $value | humanizeDuration }}";
      description = "The deploy lock of host {{ $labels.host }} has been held for more than 15 minutes: a transaction is stuck, or a deploy is far slower than usual.";
    }
    {
      alertname = "FleetRecentRollback";
      expr = "time() - fleet_last_rollback_timestamp_seconds < 3600";
      severity = "warning";
      summary = "{{ $labels.host }} rolled back within the last hour";
      description = "Host {{ $labels.host }} recorded a rollback (a change it undid, or fleet rollback) less than an hour ago.";
    }
    {
      alertname = "FleetMetricsStale";
      expr = "time() - fleet_metrics_timestamp_seconds > 300";
      severity = "warning";
      summary = "Fleet metrics of {{ $labels.host }} are stale";
      description = "Host {{ $labels.host }} has not rewritten its fleet metrics for more than 5 minutes: fleet-metrics.timer or fleet-host metrics is failing.";
    }
    {
      alertname = "FleetMetricsMissing";
      expr = ''up{job="node"} == 1 unless on(host) fleet_metrics_timestamp_seconds'';
      for = "10m";
      severity = "warning";
      summary = "No fleet metrics from {{ $labels.host }}";
      description = "The node exporter of host {{ $labels.host }} answers, but has exported no fleet metrics for 10 minutes: fleet-host metrics has never written them, or its file cannot be read.";
    }
    {
      alertname = "FleetInstanceOutOfRotation";
      expr = ''haproxy_server_status{state="UP"} == 0'';
      for = "10m";
      severity = "warning";
      summary = "{{ $labels.server }} out of rotation for {{ $labels.proxy }} on {{ $labels.host }}";
      description = "Balancer {{ $labels.host }} has sent no traffic of service {{ $labels.proxy }} to the instance on host {{ $labels.server }} for 10 minutes: it is down, drained or in maintenance.";
    }
  ];

  rules = toJSON {
    groups = [
      {
        name = "fleet-release";
        rules = recordings;
      }
      {
        name = "fleet-alerts";
        rules = alerts;
      }
    ];
  };

  rulesFile = toFile "fleet-rules.yml" rules;

  receiver = if webhook == null then "fleet-null" else "fleet-webhook";
in
{
  inherit rules rulesFile;

  prometheus = toJSON {
    global = {
      scrape_interval = interval;
      evaluation_interval = interval;
      # Which monitoring host an alert comes from.
      external_labels.monitor = thisServer;
    };
    rule_files = [ rulesFile ];
    alerting.alertmanagers = [
      { static_configs = [ { targets = [ (loopback m.alertmanagerPort) ]; } ]; }
    ];
    scrape_configs =
      nodeJob
      ++ serviceJob
      ++ healthJob
      ++ haproxyJob
      ++ ownJob "prometheus" m.prometheusPort
      ++ ownJob "alertmanager" m.alertmanagerPort;
  };

  # Every alert to the webhook (none without one), a group per alert and
  # host; a host that is down silences its own failing health checks.
  alertmanager = toJSON {
    route = {
      inherit receiver;
      group_by = [
        "alertname"
        "host"
      ];
      group_wait = "30s";
      group_interval = "5m";
      repeat_interval = "4h";
    };
    receivers = [
      (
        { name = receiver; }
        // (
          if webhook == null then
            { }
          else
            {
              webhook_configs = [
                {
                  url = webhook;
                  send_resolved = true;
                }
              ];
            }
        )
      )
    ];
    inhibit_rules = [
      {
        source_matchers = [ ''alertname="FleetHostDown"'' ];
        target_matchers = [ ''alertname="FleetHealthCheckFailing"'' ];
        equal = [ "host" ];
      }
    ];
  };

  blackbox = toJSON {
    modules = listToAttrs (
      map (service: {
        name = service;
        value = moduleOf service;
      }) probed
    );
  };
}
