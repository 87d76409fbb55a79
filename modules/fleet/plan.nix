# From a fleet declaration (the evaluated options of ./options.nix) to what
# each host runs: placement, service discovery, the problems of the
# declaration, and the inventory.
{ lib, fleetLib }:
cfg:
let
  inherit (lib)
    all
    any
    attrNames
    attrValues
    concatMap
    concatMapStringsSep
    elem
    filter
    filterAttrs
    foldl'
    genAttrs
    groupBy
    length
    lessThan
    mapAttrs
    optional
    optionals
    sort
    take
    unique
    ;

  hostNames = attrNames cfg.hosts;
  serviceNames = attrNames cfg.services;
  knownTags = sort lessThan (unique (concatMap (h: cfg.hosts.${h}.tags) hostNames));

  quote = s: ''"${s}"'';
  listing = names: if names == [ ] then "none" else concatMapStringsSep ", " quote names;
  # `"a"`, `"a" and "b"`, `"a", "b" and "c"`
  enumeration =
    names:
    if length names < 2 then
      listing names
    else
      "${listing (lib.init names)} and ${quote (lib.last names)}";
  seconds = n: "${builtins.toJSON n} s";
  anyOf = names: if names == [ ] then "any" else listing names;
  validName = n: builtins.match fleetLib.namePattern n != null;

  # Placement: the hosts that match a service's placement, and the replicas
  # chosen among them by rendezvous hashing (deterministic, and adding a
  # host moves few instances).
  candidates =
    service:
    let
      p = cfg.services.${service}.placement;
    in
    filter (
      h: (p.hosts == [ ] || elem h p.hosts) && all (t: elem t cfg.hosts.${h}.tags) p.tags
    ) hostNames;

  weight = service: host: builtins.hashString "sha256" "${service}/${host}";

  choose =
    service:
    let
      inherit (cfg.services.${service}.placement) replicas;
      matching = candidates service;
      ranked = sort (a: b: weight service a < weight service b) matching;
    in
    if replicas == null || replicas >= length matching then
      matching
    else
      sort lessThan (take replicas ranked);

  placement = genAttrs serviceNames choose;

  servicesOn = host: filter (s: elem host placement.${s}) serviceNames;

  knownDeps = service: filter (d: cfg.services ? ${d}) cfg.services.${service}.dependsOn;

  # Service discovery: where the instances of a service listen.
  addressesOf =
    service:
    let
      port = fleetLib.primaryPort cfg.services.${service};
    in
    map (h: fleetLib.hostPort cfg.hosts.${h}.address port) placement.${service};

  # Traffic: the hosts tagged traffic.balancerTag run HAProxy and serve every
  # service with an ingress; every host with an instance of one runs the
  # fleet agent the balancers ask.
  balancers = filter (h: elem cfg.traffic.balancerTag cfg.hosts.${h}.tags) hostNames;
  exposed = filter (s: cfg.services.${s}.ingress != null) serviceNames;
  runsAgent = host: any (s: cfg.services.${s}.ingress != null) (servicesOn host);

  # What a dependent is given: the balancers' frontends of a service with an
  # ingress (they spread the load and skip instances that are down or
  # drained), the instances of any other.
  endpointsOf =
    service:
    let
      inherit (cfg.services.${service}) ingress;
    in
    if ingress == null then
      addressesOf service
    else
      map (h: fleetLib.hostPort cfg.hosts.${h}.address ingress.port) balancers;

  # Monitoring: the hosts tagged monitoring.hostTag run Prometheus,
  # Alertmanager and the blackbox exporter; when there is one, every host
  # runs the node exporter.
  monitors = filter (h: elem cfg.monitoring.hostTag cfg.hosts.${h}.tags) hostNames;
  monitored = monitors != [ ];

  # The inventory's `monitoring` before the producer fills its targets in.
  monitoring =
    if !monitored then
      null
    else
      {
        servers = monitors;
        inherit (cfg.monitoring)
          prometheusPort
          alertmanagerPort
          blackboxPort
          nodeExporterPort
          haproxyPort
          scrapeInterval
          webhook
          ;
        metrics = mapAttrs (_: s: { inherit (s.metrics) port path; }) (
          filterAttrs (_: s: s.metrics != null) cfg.services
        );
      };

  # The binary cache: the host tagged cache.hostTag serves it; a fleet has
  # one at most.
  cacheHosts = filter (h: elem cfg.cache.hostTag cfg.hosts.${h}.tags) hostNames;
  cacheHost = if length cacheHosts == 1 then builtins.head cacheHosts else null;

  # The inventory's `cache` before the producer fills it in.
  cache = {
    server = cacheHost;
    inherit (cfg.cache) port publicKey directory;
  };

  # The inventory's `traffic` before the producer fills its defaults.
  traffic =
    if exposed == [ ] then
      null
    else
      {
        inherit (cfg.traffic) agentPort drainTimeout;
        inherit balancers;
        services = genAttrs exposed (
          service:
          let
            s = cfg.services.${service};
          in
          {
            inherit (s.ingress) port mode maxUnavailable;
            instances = genAttrs placement.${service} (h: {
              inherit (cfg.hosts.${h}) address;
              port = fleetLib.primaryPort s;
            });
            check = fleetLib.checkOf service s;
          }
        );
      };

  # Problems, each naming the service or host concerned.
  serviceProblems =
    service:
    let
      s = cfg.services.${service};
      p = s.placement;
      where = "service ${quote service}";
      unknownHosts = filter (h: !(cfg.hosts ? ${h})) p.hosts;
      unknownTags = filter (t: !(elem t knownTags)) p.tags;
      matching = candidates service;
      unknownDeps = filter (d: !(cfg.services ? ${d})) s.dependsOn;
      portlessDeps = filter (d: cfg.services.${d}.ports == [ ]) (knownDeps service);
    in
    optional (!validName service) "${where}: the name must match ${fleetLib.namePattern}"
    ++ map (
      h: "${where}: placement.hosts names unknown host ${quote h} (hosts: ${listing hostNames})"
    ) unknownHosts
    ++ map (
      t: "${where}: placement.tags names unknown tag ${quote t}, which no host carries (tags: ${listing knownTags})"
    ) unknownTags
    ++ optionals (unknownHosts == [ ] && unknownTags == [ ]) (
      if matching == [ ] then
        [
          "${where}: placement matches no host (hosts: ${anyOf p.hosts}; tags: ${anyOf p.tags})"
        ]
      else
        optional (p.replicas != null && p.replicas > length matching)
          "${where}: wants ${toString p.replicas} replicas but only ${toString (length matching)} hosts match its placement (${listing matching})"
    )
    ++ map (
      d: "${where}: dependsOn names unknown service ${quote d} (services: ${listing serviceNames})"
    ) unknownDeps
    ++ map (
      d: "${where}: depends on service ${quote d}, which declares no ports to be found at"
    ) portlessDeps
    ++ healthCheckProblems where s
    ++ metricsProblems where s
    ++ ingressProblems where s
    ++ fleetLib.secretProblems where s
    ++ optional (
      s.nixosModule == null && s.command == [ ]
    ) "${where}: nothing to run: set package, command or nixosModule"
    # Else the plan would generate an empty `fleet-<name>` unit, and
    # environment, limits and credentials would miss the module's unit.
    ++ optional (s.nixosModule != null && !s.unitIsSet)
      "${where}: it is run by its nixosModule, so set `unit` to the systemd service that module creates (e.g. unit = \"redis-main\" for services.redis.servers.main)";

  ingressProblems =
    where: s:
    optionals (s.ingress != null) (
      optional (s.ports == [ ])
        "${where}: ingress needs a port to send traffic to, but the service declares no ports: declare the port it listens on in `ports`"
      ++ optional (s.ingress.port == cfg.traffic.agentPort)
        "${where}: ingress.port ${toString s.ingress.port} is traffic.agentPort, where the fleet agent of every host with a balanced instance listens: choose another ingress.port, or move traffic.agentPort"
    );

  metricsProblems =
    where: s:
    let
      port = toString s.metrics.port;
      ports = concatMapStringsSep ", " toString s.ports;
    in
    optionals (s.metrics != null) (
      if s.ports == [ ] then
        [
          "${where}: metrics on port ${port}, but the service declares no ports: add ${port} to `ports`"
        ]
      else
        optional (!(elem s.metrics.port s.ports))
          "${where}: metrics on port ${port}, which the service does not declare (ports: ${ports}): add ${port} to `ports`, or set metrics.port to one of them"
    );

  healthCheckProblems =
    where: s:
    let
      check = s.healthCheck;
      port = if check.port != null then check.port else fleetLib.primaryPort s;
      ports = if s.ports == [ ] then "none" else concatMapStringsSep ", " toString s.ports;
    in
    if check == null then
      [ ]
    else
      optional (check.timeout >= cfg.deploy.healthTimeout)
        "${where}: healthCheck.timeout is ${seconds check.timeout}, not below deploy.healthTimeout (${seconds cfg.deploy.healthTimeout}): one attempt could outlast the whole health timeout and never pass; lower healthCheck.timeout or raise deploy.healthTimeout"
      ++ optional (
        check.type == "http" && builtins.match fleetLib.requestPathPattern check.path == null
      ) "${where}: healthCheck.path ${builtins.toJSON check.path} must be printable ASCII without spaces: percent-encode anything else (a space is %20)"
      ++ (
        if check.type == "command" then
          optional (check.command == [ ]) "${where}: command health check has an empty healthCheck.command"
        else if port == null then
          # A service without ports: healthCheck.port would have to be one of
          # them too.
          [
            "${where}: ${check.type} health check has no port to probe, as the service declares no ports: declare the port it listens on in `ports`, or use a command check (healthCheck.type = \"command\")"
          ]
        else
          optional (!(elem port s.ports)) (
            "${where}: ${check.type} health check on port ${toString port}, which the service does not declare (ports: ${ports}): "
            + (
              if s.ports == [ ] then
                "add ${toString port} to `ports`"
              else
                "add ${toString port} to `ports`, or set healthCheck.port to one of them"
            )
          )
      );

  hostProblems =
    host:
    let
      h = cfg.hosts.${host};
      claims = [
        {
          port = h.sshPort;
          by = "sshd (sshPort)";
        }
      ]
      ++ concatMap (
        s:
        map (port: {
          inherit port;
          by = "service ${quote s}";
        }) (unique cfg.services.${s}.ports)
      ) (servicesOn host)
      ++ optionals (elem host balancers) (
        map (s: {
          inherit (cfg.services.${s}.ingress) port;
          by = "the balancers' frontend of service ${quote s} (ingress.port)";
          frontend = true;
          fix = "give the frontend another ingress.port, or move the other off that port";
        }) exposed
      )
      ++ optional (runsAgent host) {
        port = cfg.traffic.agentPort;
        by = "the fleet agent (traffic.agentPort)";
        fix = "set traffic.agentPort to a port no host uses";
      }
      ++ optional monitored (monitoringClaim "the node exporter" "nodeExporterPort")
      ++ optionals (elem host monitors) [
        (monitoringClaim "Prometheus" "prometheusPort")
        (monitoringClaim "Alertmanager" "alertmanagerPort")
        (monitoringClaim "the blackbox exporter" "blackboxPort")
      ]
      ++ optional (monitored && exposed != [ ] && elem host balancers) (
        monitoringClaim "HAProxy's metrics exporter" "haproxyPort"
      )
      ++ optional (elem host cacheHosts) {
        inherit (cfg.cache) port;
        by = "the binary cache (cache.port)";
        fix = "set cache.port to a port no host uses";
      };
      monitoringClaim = what: option: {
        port = cfg.monitoring.${option};
        by = "${what} (monitoring.${option})";
        fix = "set monitoring.${option} to a port no host uses";
      };
      # Frontends that share a port are a problem of the traffic, named once.
      clashes = filter (c: length c > 1 && !all (x: x.frontend or false) c) (
        attrValues (groupBy (c: toString c.port) claims)
      );
      sharedUnits = filter (services: length services > 1) (
        attrValues (groupBy (s: cfg.services.${s}.unit) (servicesOn host))
      );
    in
    optional (builtins.match fleetLib.hostNamePattern host == null)
      "host ${quote host}: the name is not a valid host name (networking.hostName): use letters, digits and '-' only, at most 63 characters, not starting or ending with '-'; rename the host (its address may still be a longer DNS name)"
    ++ map (
      c:
      let
        fixes = filter (x: x ? fix) c;
      in
      "host ${quote host}: port ${toString (builtins.head c).port} is claimed twice, by ${
        concatMapStringsSep " and " (x: x.by) c
      }"
      + (if fixes == [ ] then "" else ": ${(builtins.head fixes).fix}")
    ) clashes
    ++ map (
      services:
      "host ${quote host}: services ${enumeration services} ${
        if length services == 2 then "both" else "all"
      } run as unit ${
        quote cfg.services.${builtins.head services}.unit
      }: give each its own `unit`, or place them on different hosts"
    ) sharedUnits;

  trafficProblems =
    let
      shared = filter (services: length services > 1) (
        attrValues (groupBy (s: toString cfg.services.${s}.ingress.port) exposed)
      );
    in
    optional (exposed != [ ] && balancers == [ ]) (
      "traffic: ${if length exposed == 1 then "service" else "services"} ${enumeration exposed} ${
        if length exposed == 1 then "has" else "have"
      } an ingress, but no host carries the tag ${quote cfg.traffic.balancerTag} (traffic.balancerTag) to run HAProxy: "
      + "tag the hosts that should balance (two, for redundancy), or set traffic.balancerTag to their tag"
    )
    ++ map (
      services:
      "traffic: services ${enumeration services} ${
        if length services == 2 then "both" else "all"
      } take ingress.port ${
        toString cfg.services.${builtins.head services}.ingress.port
      }, but each balancer listens on one port per service: give each its own ingress.port"
    ) shared;

  deployProblems =
    optional (cfg.deploy.confirmTimeout < 2)
      "deploy: confirmTimeout is ${seconds cfg.deploy.confirmTimeout}: set it to at least 2 s, the time a host gives the fleet tool to confirm a healthy generation before its dead-man switch reverts it"
    ++ concatMap analysisProblems (attrNames cfg.deploy.analysis);

  analysisProblems =
    name:
    let
      a = cfg.deploy.analysis.${name};
      where = "deploy.analysis.${name}";
      given = filter (o: a.${o} != null) [
        "query"
        "successRate"
        "latency"
      ];
      rate = a.successRate;
      balanced = cfg.services ? ${rate.service} && cfg.services.${rate.service}.ingress != null;
    in
    optional (!validName name) "${where}: the name must match ${fleetLib.namePattern}"
    ++ optional (given == [ ])
      "${where}: nothing to measure: set query (PromQL), or a template: successRate or latency"
    ++ optional (length given > 1)
      "${where}: sets ${enumeration given}, which exclude each other: keep one"
    ++ optional (!monitored)
      "${where}: no host carries the tag ${quote cfg.monitoring.hostTag} (monitoring.hostTag) to run the Prometheus it asks: tag a monitoring host, or remove the analysis"
    ++ optional (
      a.query != null && lib.hasInfix "{{service}}" a.query && a.service == null
    ) "${where}: the query uses {{service}}, but service is not set: set service"
    ++ optionals (rate != null) (
      if !(cfg.services ? ${rate.service}) then
        [
          "${where}: successRate.service names unknown service ${quote rate.service} (services: ${listing serviceNames})"
        ]
      else
        optional (!balanced || cfg.services.${rate.service}.ingress.mode != "http")
          "${where}: successRate counts the HTTP responses the balancers pass, but service ${quote rate.service} has no HTTP ingress: give it one, or measure it with a query"
    );

  cacheProblems =
    let
      tag = "the tag ${quote cfg.cache.hostTag} (cache.hostTag)";
      keyFile = cfg.cache.secretKeyFile;
    in
    optional (length cacheHosts > 1)
      "cache: hosts ${enumeration cacheHosts} ${
        if length cacheHosts == 2 then "both" else "all"
      } carry ${tag}, but a fleet has one binary cache: keep the tag on one of them"
    ++ optional (cacheHosts != [ ] && cfg.cache.publicKey == null)
      "cache: ${
        if length cacheHosts == 1 then "host" else "hosts"
      } ${enumeration cacheHosts} ${
        if length cacheHosts == 1 then "carries" else "carry"
      } ${tag}, but cache.publicKey is not set, and no host would trust what the cache serves: make the cache's key pair with `nix-store --generate-binary-cache-key NAME secret public`, set cache.publicKey to the contents of `public`, and put `secret` on the cache host at cache.secretKeyFile (${keyFile})"
    ++ (
      if lib.hasPrefix "${builtins.storeDir}/" keyFile then
        [
          "cache: secretKeyFile ${builtins.toJSON keyFile} is in the Nix store, which every user of every host can read: the secret key must never be built into a system; deliver it to the cache host out of band and set cache.secretKeyFile to its path there (a string, not a Nix path)"
        ]
      else
        optional (builtins.match fleetLib.plainPathPattern keyFile == null)
          "cache: secretKeyFile ${builtins.toJSON keyFile} must be an absolute path on the cache host, of letters, digits, `_`, `.`, `-` and `/`"
    );

  # A dependency cycle as a path that ends where it starts, or null.
  cycle =
    let
      # The end of a path, from its first `service` on.
      from =
        service: path:
        if path == [ ] || builtins.head path == service then
          path
        else
          from service (builtins.tail path);
      visit =
        state: path: service:
        if state.cycle != null || state.done ? ${service} then
          state
        else if elem service path then
          state
          // {
            cycle = from service path ++ [ service ];
          }
        else
          let
            after = foldl' (st: dep: visit st (path ++ [ service ]) dep) state (knownDeps service);
          in
          after // { done = after.done // { ${service} = true; }; };
    in
    (foldl' (state: visit state [ ]) {
      done = { };
      cycle = null;
    } serviceNames).cycle;

  problems =
    concatMap hostProblems hostNames
    ++ concatMap serviceProblems serviceNames
    ++ trafficProblems
    ++ deployProblems
    ++ cacheProblems
    ++ optional (cycle != null) (
      "service ${quote (builtins.head cycle)}: dependency cycle: "
      + concatMapStringsSep " -> " quote cycle
    );

  # The options read only on the hosts are type-checked here too, so that
  # the inventory fails on them as the hosts' configurations would.
  hostOnly = map (s: {
    inherit (cfg.services.${s}) allowFrom limits metrics;
    secrets = lib.mapAttrs (_: secret: { inherit (secret) file path; }) cfg.services.${s}.secrets;
  }) serviceNames;

  # Every result goes through this: a bad declaration fails evaluation with
  # all its problems at once.
  checked =
    value:
    if problems == [ ] then
      builtins.deepSeq hostOnly value
    else
      throw (
        "fleet: the declaration has ${toString (length problems)} problem(s):\n"
        + concatMapStringsSep "\n" (p: "  - ${p}") problems
      );

  checksOn =
    host: filter (c: c != null) (map (s: fleetLib.checkOf s cfg.services.${s}) (servicesOn host));

  # What the host module (../host.nix) is given: `fleet.*` of one host.
  hostPlan =
    host:
    let
      h = cfg.hosts.${host};
    in
    {
      enable = true;
      hostName = host;
      inherit (h) address sshUser sshPort;
      # Where a service's `allowFrom` defaults to.
      fleetAddresses = map (n: cfg.hosts.${n}.address) hostNames;
      inherit (cfg) authorizedKeys trustedPublicKeys;
      services = genAttrs (servicesOn host) (
        service:
        let
          s = cfg.services.${service};
        in
        removeAttrs s [
          "placement"
          "nixosModule"
          "unitIsSet"
        ]
        // {
          createUnit = s.nixosModule == null;
          dependencies = genAttrs (knownDeps service) endpointsOf;
        }
      );
      traffic = {
        inherit (cfg.traffic) agentPort;
        # The only sources the agent's port is open to.
        balancerAddresses = map (n: cfg.hosts.${n}.address) balancers;
        # What this host's HAProxy serves, when it is a balancer.
        balance = if elem host balancers then produced.traffic else null;
      };
      monitoring = {
        enable = monitored;
        inherit (cfg.monitoring) nodeExporterPort;
        # The only sources the node exporter's port is open to.
        serverAddresses = map (n: cfg.hosts.${n}.address) monitors;
        # What this host's Prometheus watches, when it is a monitoring host.
        scrape = if elem host monitors then produced.monitoring else null;
      };
      cache = {
        # Where every host substitutes from first, and the key it trusts.
        url = if produced.cache == null then null else produced.cache.url;
        inherit (cfg.cache) publicKey secretKeyFile;
        # What this host's nginx serves, when it is the cache host.
        serve = if host == cacheHost then produced.cache else null;
      };
    };

  # The NixOS modules of one host, in the order nixosSystem takes them.
  hostModules =
    host:
    let
      h = cfg.hosts.${host};
      serviceModules = concatMap (
        s: optional (cfg.services.${s}.nixosModule != null) cfg.services.${s}.nixosModule
      ) (servicesOn host);
    in
    [
      ../host.nix
      {
        _file = "fleet plan of host ${host}";
        fleet = hostPlan host;
        nixpkgs.hostPlatform = lib.mkDefault h.system;
      }
    ]
    # Host names are valid networking.hostName values (a problem otherwise).
    ++ [
      {
        _file = "fleet plan of host ${host}";
        networking.hostName = lib.mkDefault host;
      }
    ]
    ++ h.modules
    ++ serviceModules;

  # The inventory, unchecked: the balancers' plans carry its `traffic`.
  produced = fleetLib.produceInventory {
    hosts = mapAttrs (
      host: h:
      {
        inherit (h)
          address
          sshPort
          sshUser
          tags
          system
          hostKey
          ;
        services = servicesOn host;
        checks = checksOn host;
        # The secrets the tool uploads to this host before activating.
        secrets = map (s: removeAttrs s [ "upload" ]) (
          filter (s: s.upload) (
            concatMap (s: fleetLib.secretsOf s cfg.services.${s}) (servicesOn host)
          )
        );
      }
    ) cfg.hosts;
    inherit (cfg) deploy;
    services = mapAttrs (_: s: { inherit (s) dependsOn; }) cfg.services;
    inherit traffic monitoring cache;
  };
in
{
  inherit problems;

  placement = checked placement;

  inventory = checked produced;

  hosts = checked (
    genAttrs hostNames (host: {
      inherit (cfg.hosts.${host}) system;
      plan = hostPlan host;
      modules = hostModules host;
    })
  );

  # The per-service view: where each instance runs and what it finds.
  services = checked (
    genAttrs serviceNames (service: {
      hosts = placement.${service};
      addresses =
        if fleetLib.primaryPort cfg.services.${service} == null then [ ] else addressesOf service;
      dependencies = genAttrs (knownDeps service) endpointsOf;
    })
  );
}
