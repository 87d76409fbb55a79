# The NixOS module of every fleet host (the flake's nixosModules.default).
#
# The fleet-level module (./fleet) sets `fleet.*` for each host; the module
# turns it into systemd units, firewall rules, a manifest under /etc/fleet and
# the ssh access the fleet tool needs, and installs the host's half of the
# deploy protocol, `fleet-host`, with the unit that runs its boot recovery.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    any
    attrValues
    concatMap
    concatMapStrings
    concatMapStringsSep
    concatStringsSep
    elem
    filter
    hasInfix
    literalMD
    mapAttrs
    mapAttrs'
    mapAttrsToList
    mkDefault
    mkIf
    mkMerge
    mkOption
    nameValuePair
    optional
    optionalAttrs
    replaceStrings
    types
    ;

  cfg = config.fleet;
  fleetLib = import ./lib.nix { inherit lib; };
  isRoot = cfg.sshUser == "root";

  hostServiceOptions =
    { name, ... }:
    {
      options = {
        createUnit = mkOption {
          type = types.bool;
          default = true;
          description = ''
            Whether to generate the unit `fleet-<name>`; false for services
            that a NixOS module runs, whose unit still gets the ordering,
            environment and limits below.
          '';
        };
        dependencies = mkOption {
          type = types.attrsOf (types.listOf types.str);
          default = { };
          example = {
            redis = [ "192.0.2.21:6379" ];
          };
          description = "Dependency name to the `host:port` of each of its instances.";
        };
      };
    };

  localUnits =
    service:
    map (dep: "${cfg.services.${dep}.unit}.service") (
      filter (dep: cfg.services ? ${dep}) service.dependsOn
    );

  privileged = service: any (port: port < 1024) service.ports;

  # What every unit the module hardens gets: nothing to gain privileges with,
  # the system read-only, the kernel's knobs out of reach.
  hardening = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    NoNewPrivileges = true;
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    LockPersonality = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    UMask = "0077";
  };

  # The host's own small programs that read its root-only deploy state (the
  # agent, the metrics writer): root, but with no capability, no network and
  # no way to gain either.
  helperSandbox = hardening // {
    CapabilityBoundingSet = "";
    PrivateNetwork = true;
    RestrictAddressFamilies = "none";
    IPAddressDeny = "any";
    ProtectProc = "invisible";
    ProcSubset = "pid";
    MemoryDenyWriteExecute = true;
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
  };

  sandbox =
    service:
    mapAttrs (_: mkDefault) (
      hardening
      // {
        DynamicUser = true;
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        SystemCallFilter = [ "@system-service" ];
        # No capability at all, unless a port below 1024 must be bound.
        CapabilityBoundingSet = if privileged service then "CAP_NET_BIND_SERVICE" else "";
      }
      // optionalAttrs (privileged service) { AmbientCapabilities = "CAP_NET_BIND_SERVICE"; }
    );

  # What every placed service's unit gets, generated or not.
  common = name: service: {
    after = localUnits service;
    wants = localUnits service;
    environment =
      mapAttrs' (
        dep: addrs: nameValuePair (fleetLib.addrsVariable dep) (concatStringsSep "," addrs)
      ) service.dependencies
      // {
        FLEET_HOST = cfg.hostName;
        FLEET_SERVICE = name;
      }
      // service.environment;
    serviceConfig =
      optionalAttrs (service.limits.memory != null) { MemoryMax = service.limits.memory; }
      // optionalAttrs (service.limits.cpu != null) { CPUQuota = service.limits.cpu; }
      // optionalAttrs (service.secrets != { }) {
        # systemd copies each file into the unit's credentials directory
        # when it starts; `%` would start a specifier.
        LoadCredential = map (
          s: "${s.name}:${replaceStrings [ "%" ] [ "%%" ] s.path}"
        ) (fleetLib.secretsOf name service);
      };
  };

  # The unit of a service that no NixOS module runs.
  generated = service: {
    inherit (service) description;
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ];
    serviceConfig = {
      ExecStart = fleetLib.escapeExecArgs service.command;
      Restart = service.restart.policy;
      RestartSec = service.restart.delay;
      StateDirectory = service.unit;
      WorkingDirectory = "%S/${service.unit}";
    }
    // optionalAttrs service.hardening (sandbox service);
  };

  unitsOf =
    name: service:
    [ { ${service.unit} = common name service; } ]
    ++ optional service.createUnit { ${service.unit} = generated service; };

  claimedPorts = [ cfg.sshPort ] ++ concatMap (s: lib.unique s.ports) (attrValues cfg.services);
  duplicatePorts = lib.unique (filter (p: lib.count (q: q == p) claimedPorts > 1) claimedPorts);

  # The firewall: each port with `openFirewall` is open to its service's
  # `allowFrom` only, null meaning the fleet's hosts (those declared by IP).
  fleetSources = lib.unique (filter fleetLib.isAddress cfg.fleetAddresses);
  unmatchedHosts = lib.unique (filter (a: !fleetLib.isAddress a) cfg.fleetAddresses);
  sourcesOf =
    service: if service.allowFrom == null then fleetSources else lib.unique service.allowFrom;
  isV6 = source: hasInfix ":" source;

  # Traffic: this host runs the fleet agent when it has an instance of a
  # balanced service, and HAProxy when it is a balancer.
  balancerSources = lib.unique (filter fleetLib.isAddress cfg.traffic.balancerAddresses);
  unmatchedBalancers = lib.unique (
    filter (a: !fleetLib.isAddress a) cfg.traffic.balancerAddresses
  );
  balanced = filter (name: cfg.services.${name}.ingress != null) (lib.attrNames cfg.services);
  runsAgent = balanced != [ ];
  inherit (cfg.traffic) balance;
  frontendPorts = lib.optionals (balance != null) (
    lib.unique (map (s: s.port) (attrValues balance.services))
  );

  # Monitoring: with monitoring hosts in the fleet, every host runs the node
  # exporter, open to them only; they run Prometheus, Alertmanager and the
  # blackbox exporter on 127.0.0.1, and scrape the balancers' HAProxy.
  inherit (cfg) monitoring;
  monitorSources = lib.unique (filter fleetLib.isAddress monitoring.serverAddresses);
  unmatchedMonitors = lib.unique (filter (a: !fleetLib.isAddress a) monitoring.serverAddresses);
  inherit (monitoring) scrape;
  monitoringFiles = fleetLib.prometheusConfig {
    monitoring = scrape;
    server = cfg.hostName;
  };
  metricsDir = fleetLib.defaults.monitoring.textfileDirectory;
  haproxyMetricsPort = if balance == null then null else balance.metricsPort or null;
  # What the monitoring hosts reach of a service: its metrics, and its
  # check when it is one they can probe from elsewhere (HTTP or TCP).
  probedTypes = [
    "http"
    "tcp"
  ];
  watched =
    service:
    service.metrics != null
    || (service.healthCheck != null && elem service.healthCheck.type probedTypes);

  # The binary cache: every host substitutes from it first; the cache host
  # runs nginx serving its folder, open to the fleet's hosts only.
  inherit (cfg) cache;
  inherit (cache) serve;
  cacheFiles = fleetLib.cacheConfig { cache = serve; };
  cacheDefaults = fleetLib.defaults.cache;
  usesCache = cache.url != null;
  # The secret key's folder is the module's only at its default path:
  # another is its secret manager's (agenix, sops-nix) or the operator's.
  ownKeyFolder = cache.secretKeyFile == cacheDefaults.secretKeyFile;
  storeKey = lib.hasPrefix "${builtins.storeDir}/" cache.secretKeyFile;

  # The balancers reach the instances of what they balance (traffic and
  # checks), the monitoring hosts those of what they watch, whatever
  # `allowFrom` says.
  openTo =
    service:
    lib.unique (
      sourcesOf service
      ++ lib.optionals (service.ingress != null) balancerSources
      ++ lib.optionals (monitoring.enable && watched service) monitorSources
    );

  # One entry per service with open ports: what the rules say they are for,
  # the ports and the sources; the agent's port is open to the balancers
  # only.
  openings =
    concatMap (
      name:
      let
        service = cfg.services.${name};
      in
      optional (service.openFirewall && service.ports != [ ]) {
        what = "fleet service ${name}";
        ports = lib.unique service.ports;
        sources = openTo service;
      }
    ) (lib.attrNames cfg.services)
    ++ optional runsAgent {
      what = "fleet agent";
      ports = [ cfg.traffic.agentPort ];
      sources = balancerSources;
    }
    ++ optional monitoring.enable {
      what = "fleet node exporter";
      ports = [ monitoring.nodeExporterPort ];
      sources = monitorSources;
    }
    ++ optional (haproxyMetricsPort != null) {
      what = "fleet haproxy metrics";
      ports = [ haproxyMetricsPort ];
      sources = monitorSources;
    }
    ++ optional (serve != null) {
      what = "fleet binary cache";
      ports = [ serve.port ];
      sources = fleetSources;
    };

  # iptables (networking.firewall.extraCommands): rules appended to NixOS's
  # `nixos-fw` chain before its final refusal, one per source and port;
  # `-D` deletes them again (extraStopCommands).
  iptablesRules =
    action:
    let
      program = source: if isV6 source then "ip6tables" else "iptables";
      suffix = lib.optionalString (action == "-D") " 2>/dev/null || true";
      rule =
        source: port:
        "${program source} -w ${action} nixos-fw -p tcp --dport ${toString port} -s ${source} -j nixos-fw-accept${suffix}\n";
      rulesOf =
        o:
        "# ${o.what}\n"
        + concatMapStrings (source: concatMapStrings (rule source) o.ports) (
          filter (s: !isV6 s || config.networking.enableIPv6) o.sources
        );
    in
    concatMapStrings rulesOf openings;

  # nftables (networking.firewall.extraInputRules): rules of the `nixos-fw`
  # table's input-allow chain, one per source.
  nftablesRules =
    let
      family = source: if isV6 source then "ip6" else "ip";
      portsOf =
        o:
        if lib.length o.ports == 1 then
          toString (lib.head o.ports)
        else
          "{ ${concatMapStringsSep ", " toString o.ports} }";
      rulesOf =
        o:
        concatMapStrings (
          source:
          "${family source} saddr ${source} tcp dport ${portsOf o} accept comment \"${o.what}\"\n"
        ) o.sources;
    in
    concatMapStrings rulesOf openings;

  defaultedOpenings = filter (
    name:
    let
      service = cfg.services.${name};
    in
    service.openFirewall && service.ports != [ ] && service.allowFrom == null
  ) (lib.attrNames cfg.services);

  secrets = concatMap (name: fleetLib.secretsOf name cfg.services.${name}) (
    lib.attrNames cfg.services
  );
  secretProblems = concatMap (
    name:
    fleetLib.secretProblems "fleet: host ${cfg.hostName}: service \"${name}\"" cfg.services.${name}
  ) (lib.attrNames cfg.services);

  forwarding = config.services.openssh.settings.AllowTcpForwarding or true;

  # What the deploy user may run as root (the tool calls exactly this path).
  runningHelper = "/run/current-system/sw/bin/fleet-host";

  # The unit that resolves, at every boot, a transaction a crash left behind
  # (docs/transaction.md). Its name is reserved among the services' units.
  bootUnit = "fleet-host-boot";
  # The fleet agent's socket, and the template of its per-connection service.
  agentUnit = "fleet-agent";
  # The service and timer that write the deploy state for the node exporter.
  metricsUnit = "fleet-metrics";
  # Unit names the host module keeps: its boot recovery, its agent, its metrics, and
  # `fleet`, whose StateDirectory would be /var/lib/fleet, where the host keeps its
  # transaction and release records.
  reservedUnits = [
    bootUnit
    "fleet"
    agentUnit
    "${agentUnit}@"
    metricsUnit
  ];
  clashing = filter (name: elem cfg.services.${name}.unit reservedUnits) (
    lib.attrNames cfg.services
  );
in
{
  options.fleet = {
    enable = lib.mkEnableOption "this host's part of a fleet deployed by the fleet tool";

    hostName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "The host's name in the fleet inventory.";
    };

    address = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "192.0.2.11";
      description = ''
        The host's address in the inventory, where the fleet tool and the
        other hosts reach it; host modules may use it to configure an
        interface.
      '';
    };

    fleetAddresses = mkOption {
      type = types.listOf types.str;
      default = optional (cfg.address != null) cfg.address;
      defaultText = lib.literalExpression ''
        lib.optional (config.fleet.address != null) config.fleet.address
      '';
      example = [
        "192.0.2.11"
        "192.0.2.12"
      ];
      description = ''
        The addresses of every host of the fleet, this one included: the
        sources a service's ports are open to when its `allowFrom` is null.
        Addresses that are DNS names are left out (a firewall matches
        addresses), with a warning.
      '';
    };

    sshUser = mkOption {
      type = types.strMatching "[a-z_][a-z0-9_-]*";
      default = "root";
      description = ''
        User the fleet tool logs in as. Any user other than root is created
        and may run, through sudo and without a password, exactly one program
        as root: the running system's `fleet-host`, which switches only to
        systems signed by one of {option}`fleet.trustedPublicKeys` or to
        generations of the system profile. Such a user is not trusted by Nix:
        the closures it copies must carry those signatures.
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf (types.strMatching fleetLib.publicKeyPattern);
      default = [ ];
      example = [ "fleet-1:3qg8DBpGBBq5Dw6WXnP5mUGQA+ToSOLsVsX9HYEfNrs=" ];
      description = ''
        Public keys (`nix-store --generate-binary-cache-key`) whose signatures
        this host accepts on the closures the fleet tool copies, added to
        Nix's `trusted-public-keys`. The operator signs with the secret half
        (`signingKey` in the operator's configuration). Required when
        {option}`fleet.sshUser` is not root.
      '';
    };

    sshPort = mkOption {
      type = types.port;
      default = 22;
      description = "Port of sshd.";
    };

    authorizedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "ssh public keys the fleet tool logs in with.";
    };

    services = mkOption {
      type = types.attrsOf (
        types.submodule [
          ./service.nix
          hostServiceOptions
        ]
      );
      default = { };
      description = "The service instances placed on this host.";
    };

    traffic = {
      agentPort = mkOption {
        type = types.port;
        default = fleetLib.defaults.traffic.agentPort;
        description = ''
          Port of the fleet agent, which runs when a service of this host has
          an `ingress`: the balancers ask it whether to keep the host's
          instances in rotation.
        '';
      };
      balancerAddresses = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "192.0.2.31"
          "192.0.2.32"
        ];
        description = ''
          Addresses of the fleet's balancers: the only sources the agent's
          port is open to, and sources every port of a service with an
          `ingress` is open to as well (the balancers send it traffic and
          check it). DNS names cannot be matched by a firewall; they are left
          out, with a warning.
        '';
      };
      balance = mkOption {
        type = types.nullOr types.attrs;
        default = null;
        description = ''
          When this host is one of the fleet's balancers, the fleet's traffic
          as the inventory has it (`traffic`, docs/inventory.md): the host
          runs HAProxy (`services.haproxy`) with the configuration
          fleet/nix/haproxy.nix makes of it, its frontends open to everyone.
          Null on other hosts.
        '';
      };
    };

    monitoring = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Whether the fleet has monitoring hosts. This host then runs the node
          exporter (with the systemd collector, and the textfile collector
          reading what `fleet-metrics.timer` makes `fleet-host metrics` write
          every minute: the host's deploy state), its port open to
          {option}`fleet.monitoring.serverAddresses` only.
        '';
      };
      nodeExporterPort = mkOption {
        type = types.port;
        default = fleetLib.defaults.monitoring.nodeExporterPort;
        description = "Port of the node exporter.";
      };
      serverAddresses = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "192.0.2.41" ];
        description = ''
          Addresses of the fleet's monitoring hosts: the only sources the
          node exporter's port (and, on a balancer, HAProxy's exporter's) is
          open to, and sources every port of a service with `metrics` or an
          HTTP or TCP `healthCheck` is open to as well (they scrape and probe
          it). DNS names cannot be matched by a firewall; they are left out,
          with a warning.
        '';
      };
      scrape = mkOption {
        type = types.nullOr types.attrs;
        default = null;
        description = ''
          When this host is one of the fleet's monitoring hosts, the fleet's
          monitoring as the inventory has it (`monitoring`,
          docs/inventory.md): the host runs Prometheus, Alertmanager and the
          blackbox exporter, on 127.0.0.1 only, with the configuration
          fleet/nix/prometheus.nix makes of it. Null on other hosts.
        '';
      };
    };

    cache = {
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "http://192.0.2.51:5080";
        description = ''
          The fleet's binary cache, which this host substitutes from before
          any other substituter (Nix's `substituters`), trusting
          {option}`fleet.cache.publicKey`; null when the fleet has none.
        '';
      };
      publicKey = mkOption {
        type = types.nullOr (types.strMatching fleetLib.publicKeyPattern);
        default = null;
        example = "fleet-cache-1:3qg8DBpGBBq5Dw6WXnP5mUGQA+ToSOLsVsX9HYEfNrs=";
        description = ''
          The key the cache signs its paths with (`NAME:BASE64`, as
          `nix-store --generate-binary-cache-key` writes it), added to Nix's
          `trusted-public-keys`. Required with {option}`fleet.cache.url` or
          {option}`fleet.cache.serve`.
        '';
      };
      secretKeyFile = mkOption {
        type = types.str;
        default = cacheDefaults.secretKeyFile;
        description = ''
          On the cache host, where the secret half of the cache's key is:
          `fleet-host publish` signs with it. It is delivered out of band,
          never through the Nix store. The module makes the default's
          folder, root-only; another path's folder is left to what puts the
          key there.
        '';
      };
      serve = mkOption {
        type = types.nullOr types.attrs;
        default = null;
        description = ''
          When this host serves the fleet's binary cache, the fleet's cache
          as the inventory has it (`cache`, docs/inventory.md): the host runs
          nginx (`services.nginx`) with the server fleet/nix/cache.nix makes
          of it, serving `directory` read-only on `port`, open to
          {option}`fleet.fleetAddresses` only, and its manifest tells
          `fleet-host publish` the folder and the key. Null on other hosts.
        '';
      };
    };

    manifest = mkOption {
      type = types.raw;
      readOnly = true;
      description = "What /etc/fleet/manifest.json says: the host's services and checks.";
    };

    hostHelper = mkOption {
      type = types.package;
      readOnly = true;
      default = import ./fleet-host-package.nix {
        inherit lib;
        inherit (pkgs) runCommand python3;
        systemd = config.systemd.package;
        nix = config.nix.package;
      };
      defaultText = literalMD ''
        `fleet-host` from fleet/hostside/fleet_host.py, run by `pkgs.python3`,
        with the programs of `config.systemd.package` and `config.nix.package`
      '';
      description = ''
        The host's half of the deploy protocol (docs/transaction.md): one
        Python program, `fleet-host`, whose systemctl, systemd-run, bootctl,
        nix-env and nix-store are this host's. With `fleet.enable` it is in
        `environment.systemPackages`, so that every generation has it at
        `$toplevel/sw/bin/fleet-host`.
      '';
    };
  };

  config = mkIf cfg.enable {
    fleet.manifest = {
      manifestVersion = 1;
      host = cfg.hostName;
      inherit (cfg) address;
      services = mapAttrs (_: service: {
        unit = "${service.unit}.service";
        managedBy = if service.createUnit then "fleet" else "nixos-module";
        inherit (service) ports dependsOn dependencies;
        allowFrom = if service.openFirewall then openTo service else [ ];
      }) cfg.services;
      checks = filter (c: c != null) (mapAttrsToList fleetLib.checkOf cfg.services);
      inherit secrets;
      # What `fleet-host publish` writes to and signs with, on the cache host.
      cache =
        if serve == null then
          null
        else
          {
            inherit (serve) directory;
            inherit (cache) secretKeyFile;
          };
    };

    environment.etc."fleet/manifest.json".text = builtins.toJSON cfg.manifest;

    environment.systemPackages = [ cfg.hostHelper ];

    systemd.services = mkMerge (
      [
        {
          ${bootUnit} = {
            description = "Resolve a fleet transaction left unfinished by a crash";
            # After the system is up: the recovery may run
            # switch-to-configuration, which starts multi-user.target and would
            # wait for this very unit if it were ordered before it.
            wantedBy = [ "multi-user.target" ];
            after = [ "multi-user.target" ];
            # It runs once per boot; a deploy that changes it must not run it
            # again in the middle of its own transaction. (stopIfChanged only
            # matters for units that switch-to-configuration restarts.)
            restartIfChanged = false;
            serviceConfig = {
              Type = "oneshot";
              RemainAfterExit = true;
              ExecStart = "${lib.getExe cfg.hostHelper} boot";
              Restart = "no";
            };
          };
        }
      ]
      ++ optional runsAgent {
        "${agentUnit}@" = {
          description = "fleet agent answering a balancer";
          # One instance per connection: one that fails (a balancer that hung
          # up, an answer past RuntimeMaxSec on a loaded host) is unloaded, not
          # left failed, which would fail every deploy's health check; the
          # balancer keeps its own check's verdict meanwhile.
          unitConfig.CollectMode = "inactive-or-failed";
          # Root, to read the root-only deploy state, but with no capability,
          # no network of its own (the connection is passed in) and nothing
          # writable.
          serviceConfig = helperSandbox // {
            ExecStart = "${runningHelper} agent";
            StandardInput = "socket";
            StandardOutput = "socket";
            StandardError = "journal";
            RuntimeMaxSec = 5;
          };
        };
      }
      ++ optional monitoring.enable {
        ${metricsUnit} = {
          description = "Write the host's deploy state for the node exporter";
          # Root, to read the root-only deploy state, but with no capability,
          # no network and nothing writable but the node exporter's textfile
          # folder.
          serviceConfig = helperSandbox // {
            Type = "oneshot";
            # `-`: a run that fails leaves no failed unit, which would fail
            # every deploy's health check; FleetMetricsStale says it instead.
            ExecStart = "-${runningHelper} metrics";
            TimeoutStartSec = 30;
            StateDirectory = baseNameOf metricsDir;
            StateDirectoryMode = "0755";
          };
        };
      }
      ++ concatMap (x: x) (mapAttrsToList unitsOf cfg.services)
    );

    systemd.timers = mkIf monitoring.enable {
      ${metricsUnit} = {
        description = "Write the host's deploy state for the node exporter every minute";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = "minutely";
          AccuracySec = "5s";
        };
      };
    };

    # The transaction record and the release records; the host's lock.
    systemd.tmpfiles.rules = [
      "d /var/lib/fleet 0700 root root - -"
      "d /run/fleet 0700 root root - -"
    ]
    # The secrets the fleet tool uploads, root-only.
    ++ optional (any (s: s.upload) secrets) "d ${fleetLib.secretsDir} 0700 root root - -"
    # The deploy state for the node exporter, which reads it as a user of its own.
    ++ optional monitoring.enable "d ${metricsDir} 0755 root root - -"
    # The binary cache: written by root (`fleet-host publish`), read by nginx;
    # the secret key's folder, root-only.
    ++ lib.optionals (serve != null) (
      [ "d ${serve.directory} 0755 root root - -" ]
      ++ optional ownKeyFolder "d ${dirOf cache.secretKeyFile} 0700 root root - -"
    );

    # The services' ports, open to their sources only (sshd's port is the
    # openssh module's). The nftables firewall refuses extraCommands.
    networking.firewall.extraCommands = mkIf (!config.networking.nftables.enable) (
      iptablesRules "-A"
    );
    networking.firewall.extraStopCommands = mkIf (!config.networking.nftables.enable) (
      iptablesRules "-D"
    );
    networking.firewall.extraInputRules = mkIf config.networking.nftables.enable nftablesRules;

    warnings =
      optional (defaultedOpenings != [ ] && unmatchedHosts != [ ]) (
        "fleet: host ${cfg.hostName}: service(s) "
        + concatMapStringsSep ", " (name: ''"${name}"'') defaultedOpenings
        + " open their ports to the fleet's hosts, but the firewall cannot match DNS names ("
        + concatStringsSep ", " unmatchedHosts
        + "): those hosts are refused; list their IP addresses or prefixes in the services' allowFrom."
      )
      ++ optional (runsAgent && unmatchedBalancers != [ ]) (
        "fleet: host ${cfg.hostName}: the fleet agent's port is open to the balancers, but the firewall cannot match DNS names ("
        + concatStringsSep ", " unmatchedBalancers
        + "): those balancers cannot ask it, and keep this host's instances in rotation while a deploy changes them; declare the balancers by IP address."
      )
      ++ optional (serve != null && unmatchedHosts != [ ]) (
        "fleet: host ${cfg.hostName}: the binary cache's port is open to the fleet's hosts, but the firewall cannot match DNS names ("
        + concatStringsSep ", " unmatchedHosts
        + "): those hosts cannot fetch from the cache, and every deploy copies their closures from the operator's machine; declare them by IP address."
      )
      ++ optional (monitoring.enable && unmatchedMonitors != [ ]) (
        "fleet: host ${cfg.hostName}: the node exporter's port is open to the monitoring hosts, but the firewall cannot match DNS names ("
        + concatStringsSep ", " unmatchedMonitors
        + "): those monitoring hosts cannot scrape this host nor probe its services; declare the monitoring hosts by IP address."
      );

    # The balancers: HAProxy with the fleet's configuration, its frontends
    # open to everyone (they are the services' public entry points).
    services.haproxy = mkIf (balance != null) {
      enable = true;
      config = fleetLib.haproxyConfig balance;
    };
    networking.firewall.allowedTCPPorts = frontendPorts;

    # Monitoring: the node exporter on every host; Prometheus, Alertmanager
    # and the blackbox exporter on the monitoring hosts, on 127.0.0.1 only
    # (the fleet tool reaches Prometheus through its ssh connection).
    services.prometheus = mkMerge [
      (mkIf monitoring.enable {
        exporters.node = {
          enable = true;
          port = monitoring.nodeExporterPort;
          # Every IPv6 address too, when a monitoring host has one.
          listenAddress = mkDefault (if any isV6 monitorSources then "[::]" else "0.0.0.0");
          enabledCollectors = [ "systemd" ];
          extraFlags = [ "--collector.textfile.directory=${metricsDir}" ];
        };
      })
      (mkIf (scrape != null) {
        enable = true;
        listenAddress = "127.0.0.1";
        port = scrape.prometheusPort;
        # It names the rules' store path; promtool checks both at build time.
        configText = monitoringFiles.prometheus;
        checkConfig = mkDefault true;
        alertmanager = {
          enable = true;
          listenAddress = "127.0.0.1";
          port = scrape.alertmanagerPort;
          configText = monitoringFiles.alertmanager;
          # No cluster: its gossip would listen on every address, port 9094.
          extraFlags = [ "--cluster.listen-address=" ];
        };
        exporters.blackbox = {
          enable = true;
          listenAddress = "127.0.0.1";
          port = scrape.blackboxPort;
          configFile = pkgs.writeText "fleet-blackbox.yml" monitoringFiles.blackbox;
        };
      })
    ];

    # The binary cache host: nginx serving the cache's folder, read-only.
    services.nginx = mkIf (serve != null) {
      enable = true;
      appendHttpConfig = cacheFiles.server;
      # No `localhost` virtual host, nixpkgs' default: it would listen on
      # port 80, which may be a balancer's frontend.
      virtualHosts = mkDefault { };
    };

    # The fleet agent: the balancers ask it, once a second per instance,
    # whether to keep this host's instance of a service in rotation ("ready
    # 100%", "ready NN%" or "drain", from the deploy's state under /run/fleet
    # and /var/lib/fleet). One short-lived process per connection, with the
    # connection as its standard input and output.
    systemd.sockets = mkIf runsAgent {
      ${agentUnit} = {
        description = "fleet agent, asked by the balancers";
        wantedBy = [ "sockets.target" ];
        listenStreams = [ (toString cfg.traffic.agentPort) ];
        socketConfig = {
          Accept = true;
          MaxConnections = 64;
          # As the firewall: the balancers only.
          IPAddressAllow = balancerSources;
          IPAddressDeny = "any";
        };
      };
    };

    # The fleet tool logs in with ssh, copies closures, activates them, and
    # tunnels HTTP and TCP health checks to 127.0.0.1 over the connection.
    services.openssh = {
      enable = true;
      ports = [ cfg.sshPort ];
      settings = {
        AllowTcpForwarding = true;
        PasswordAuthentication = mkDefault false;
        KbdInteractiveAuthentication = mkDefault false;
      };
    };

    users.users.${cfg.sshUser} = {
      openssh.authorizedKeys.keys = cfg.authorizedKeys;
    }
    // optionalAttrs (!isRoot) {
      isSystemUser = true;
      group = cfg.sshUser;
      useDefaultShell = true;
      description = "fleet deployments";
    };
    users.groups = optionalAttrs (!isRoot) { ${cfg.sshUser} = { }; };

    # The deploy user is not a trusted Nix user: what it copies must be signed.
    nix.settings.extra-trusted-public-keys = mkIf (cfg.trustedPublicKeys != [ ]) cfg.trustedPublicKeys;

    # The binary cache, before any other substituter, and the key it signs
    # with.
    nix.settings.substituters = mkIf usesCache (lib.mkBefore [ cache.url ]);
    nix.settings.trusted-public-keys = mkIf usesCache (
      optional (cache.publicKey != null) cache.publicKey
    );
    # A deploy pushes a closure before the hosts fetch it, but a host may
    # have asked the cache for a path before it was there (an earlier push
    # failed, or was cut): with Nix's default (3600 s) it would believe the
    # miss for an hour, and every deploy in that hour would copy the path
    # from the operator's machine. 0 asks again each time; Nix has no such
    # setting per substituter, so it holds for every one, at the cost of one
    # request per missing path and substituter when a path is wanted.
    nix.settings.narinfo-cache-negative-ttl = mkIf usesCache (mkDefault 0);
    # A cache host that is down must not hold a deploy for minutes: with
    # Nix's default (0, no limit of its own) a connection to a host that
    # does not answer waits until the kernel gives up, about two minutes,
    # and Nix tries again. A connection to a host of the fleet, or to a
    # public cache, opens well within 5 s.
    nix.settings.connect-timeout = mkIf usesCache (mkDefault 5);

    # One program, at a path only root can change: the running system's
    # fleet-host, which checks what it is asked to switch to (docs/security.md).
    security.sudo.extraRules = optional (!isRoot) {
      users = [ cfg.sshUser ];
      runAs = "root";
      commands = [
        {
          command = runningHelper;
          # NOSETENV: the caller's environment never reaches the program, even
          # where a site's sudo defaults allow it for other commands.
          options = [
            "NOPASSWD"
            "NOSETENV"
          ];
        }
      ];
    };

    # Deployments switch to new generations in place.
    system.switch.enable = true;

    assertions = [
      {
        assertion = elem forwarding [
          true
          "yes"
          "all"
          "local"
        ];
        message = "fleet: services.openssh.settings.AllowTcpForwarding must stay on: the fleet tool tunnels HTTP and TCP health checks over ssh.";
      }
      {
        assertion = clashing == [ ];
        message = "fleet: host ${cfg.hostName}: service(s) ${concatStringsSep ", " (map (n: ''"${n}"'') clashing)} would run as unit ${concatStringsSep ", " (map (n: cfg.services.${n}.unit) clashing)}, which the fleet host module reserves (${bootUnit} is its boot recovery, ${agentUnit} the agent the balancers ask; fleet would own /var/lib/fleet, the host's transaction and records): rename the service or set its `unit`.";
      }
      {
        assertion = isRoot || cfg.trustedPublicKeys != [ ];
        message = "fleet: host ${cfg.hostName}: fleet.sshUser is \"${cfg.sshUser}\", not root, so Nix does not trust what it copies: set fleet.trustedPublicKeys to the public key whose secret half the operators sign closures with (`signingKey` in their fleet config), or deploy as root.";
      }
      {
        assertion = secretProblems == [ ];
        message = concatStringsSep "\n" secretProblems;
      }
      {
        assertion = (usesCache || serve != null) -> cache.publicKey != null;
        message = "fleet: host ${cfg.hostName}: the fleet has a binary cache, but fleet.cache.publicKey is not set, and Nix refuses every path the cache offers without a trusted signature: set cache.publicKey in the fleet's declaration to the public half of the cache's key (`nix-store --generate-binary-cache-key NAME secret public` writes it to `public`).";
      }
      {
        assertion = serve != null -> !storeKey;
        message = "fleet: host ${cfg.hostName}: fleet.cache.secretKeyFile is ${builtins.toJSON cache.secretKeyFile}, in the Nix store, which every user of the host can read: never build the cache's secret key into a system; deliver it to the host out of band and set cache.secretKeyFile to its path there (a string, not a Nix path).";
      }
      {
        assertion = duplicatePorts == [ ];
        message = "fleet: host ${cfg.hostName}: port(s) ${concatStringsSep ", " (map toString duplicatePorts)} claimed twice among sshd and the fleet services.";
      }
    ];
  };
}
