# Options that describe one service, shared by the fleet declaration
# (`services.<name>`) and by the host module (`fleet.services.<name>`), so both
# levels agree on names, types and defaults.
{
  name,
  config,
  lib,
  ...
}:
let
  inherit (lib)
    literalExpression
    literalMD
    mkOption
    types
    ;

  fleetLib = import ./lib.nix { inherit lib; };
  checkDefaults = fleetLib.defaults.check;

  metrics = {
    options = {
      port = mkOption {
        type = types.port;
        example = 9102;
        description = ''
          Port the service serves its Prometheus metrics on; it must be one
          of the service's `ports`.
        '';
      };
      path = mkOption {
        type = fleetLib.metricsPathType;
        default = fleetLib.defaults.metrics.path;
        description = "Path of the metrics, scraped as `http://<address>:<port><path>`.";
      };
    };
  };

  secret =
    { name, ... }:
    {
      options = {
        file = mkOption {
          type = types.nullOr (types.strMatching fleetLib.secretNamePattern);
          default = name;
          defaultText = literalMD "the credential's name (the attribute name)";
          example = "redis-password";
          description = ''
            Name of the file in the operator's secrets folder (`secretsDir`
            of the fleet tool's configuration) that the tool uploads to
            `${fleetLib.secretsDir}/<service>/<name>` on the host before it
            activates a generation. Only a file name: where the folder is,
            only the operator's own configuration says. Ignored when `path`
            is set; null only with `path`.
          '';
        };
        path = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "/run/agenix/redis-password";
          description = ''
            Absolute path of a file that is already on the host, put there by
            something else (agenix's `/run/agenix/<name>`, sops-nix's
            `/run/secrets/<name>`). When set, the fleet tool uploads nothing
            and `file` is ignored.
          '';
        };
      };
    };

  healthCheck = {
    options = {
      type = mkOption {
        type = types.enum [
          "http"
          "tcp"
          "command"
        ];
        description = ''
          How the fleet tool probes the service after an activation: an HTTP
          request, a TCP connection (both made from the host itself to
          127.0.0.1, tunnelled over the tool's ssh connection), or a command
          run on the host.
        '';
      };
      port = mkOption {
        type = types.nullOr types.port;
        default = null;
        defaultText = literalExpression "the service's first port";
        description = "Port probed by an HTTP or TCP check; it must be one of the service's `ports`.";
      };
      path = mkOption {
        type = types.strMatching "/.*";
        default = checkDefaults.path;
        description = "Path requested by an HTTP check.";
      };
      expectStatus = mkOption {
        type = types.ints.between 100 599;
        default = checkDefaults.expectStatus;
        description = "HTTP status an HTTP check expects.";
      };
      expectBody = mkOption {
        type = types.nullOr types.str;
        default = checkDefaults.expectBody;
        description = "Text the body of an HTTP check's answer must contain, or null for any body.";
      };
      command = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "systemctl"
          "is-active"
          "fleet-worker.service"
        ];
        description = "Argument vector a command check runs on the host; exit status 0 is healthy.";
      };
      timeout = mkOption {
        type = types.numbers.positive;
        default = checkDefaults.timeout;
        description = ''
          Seconds one probe may take. In a fleet declaration it must be below
          `deploy.healthTimeout`: a longer probe could never pass in time.
        '';
      };
      interval = mkOption {
        type = types.numbers.positive;
        default = checkDefaults.interval;
        description = "Seconds between probes.";
      };
      retries = mkOption {
        type = types.ints.positive;
        default = checkDefaults.retries;
        description = "Probes made before the check counts as failed.";
      };
    };
  };

  ingress = {
    options = {
      port = mkOption {
        type = types.port;
        example = 80;
        description = ''
          Port the fleet's balancers listen on for the service, on every host
          tagged `traffic.balancerTag`: the service's public entry point,
          open to everyone. No two services may share it.
        '';
      };
      mode = mkOption {
        type = types.enum [
          "http"
          "tcp"
        ];
        default = "http";
        description = ''
          How HAProxy balances the service: "http" parses each request (it can
          retry a request an instance dropped, and adds X-Forwarded-For);
          "tcp" forwards connections as they are, for any other protocol.
        '';
      };
      maxUnavailable = mkOption {
        type = types.either types.ints.positive (types.strMatching "([1-9][0-9]?|100)%");
        default = 1;
        example = "25%";
        description = ''
          How many instances of the service a deploy may take out of the
          balancers' rotation at once: a count, or a share of the instances
          such as "25%" (rounded down, at least 1).
        '';
      };
    };
  };
in
{
  options = {
    description = mkOption {
      type = types.str;
      default = "fleet service ${name}";
      description = "One line describing the service; the systemd unit's description.";
    };

    package = mkOption {
      type = types.nullOr types.package;
      default = null;
      description = "Package that provides the service's program.";
    };

    command = mkOption {
      type = types.listOf types.str;
      default = lib.optional (config.package != null) (lib.getExe config.package);
      defaultText = literalExpression "[ (lib.getExe package) ]";
      example = literalExpression ''[ (lib.getExe pkgs.my-api) "--port" "8080" ]'';
      description = "Argument vector the service runs; systemd's ExecStart.";
    };

    environment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      description = "Environment variables of the service, added to the discovery variables.";
    };

    ports = mkOption {
      type = types.listOf types.port;
      default = [ ];
      description = ''
        TCP ports the service listens on. The first one is where dependent
        services find it. They are opened in the host's firewall to the
        sources in `allowFrom` unless `openFirewall` is false, and no two
        services of one host may claim the same port.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = true;
      description = "Whether to open `ports` in the host's firewall, to the sources in `allowFrom`.";
    };

    allowFrom = mkOption {
      type = types.nullOr (types.listOf fleetLib.sourceType);
      default = null;
      defaultText = literalMD "`null`: the addresses of the fleet's hosts";
      example = [
        "192.0.2.0/24"
        "2001:db8::/32"
      ];
      description = ''
        Sources (IPv4 or IPv6 addresses or CIDR prefixes) the host's firewall
        lets reach `ports` when `openFirewall` is set. The default, `null`,
        is every host of the fleet (the IP addresses among the hosts'
        `address`; a host declared by DNS name cannot be matched and is left
        out, with a warning). `[ "0.0.0.0/0" "::/0" ]` opens the ports to
        everyone; `[ ]` to no one.
      '';
    };

    secrets = mkOption {
      type = types.attrsOf (types.submodule secret);
      default = { };
      example = literalExpression ''
        {
          redis-password = { };                          # uploaded by the fleet tool
          api-token.path = "/run/agenix/api-token";      # already on the host
        }
      '';
      description = ''
        Credentials of the service, by name (a file name: letters, digits,
        `_`, `.`, `-`). Their contents never enter the Nix store: the unit
        gets `LoadCredential=<name>:<file on the host>` and the service
        reads `$CREDENTIALS_DIRECTORY/<name>` (in a unit's own `ExecStart`,
        `%d/<name>`; `command` is quoted, so `%` and `$` stay literal there).
        A credential comes from the operator's secrets folder (`file`,
        uploaded by the fleet tool to
        `${fleetLib.secretsDir}/<service>/<name>`, root-only) or from a file
        already on the host (`path`).
      '';
    };

    dependsOn = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = ''
        Services this one talks to. Their instances' addresses reach it as
        `FLEET_<SERVICE>_ADDRS=host:port,...`; instances on the same host are
        started first.
      '';
    };

    unit = mkOption {
      type = types.str;
      default = "fleet-${name}";
      example = "redis-main";
      description = ''
        The systemd service (without `.service`) that runs the service. A
        service run by a NixOS module (see `nixosModule`) must set it to the
        unit that module creates; no two services of one host may share a
        unit.
      '';
    };

    ingress = mkOption {
      type = types.nullOr (types.submodule ingress);
      default = null;
      example = literalExpression ''
        {
          port = 80;
          mode = "http";
          maxUnavailable = "25%";
        }
      '';
      description = ''
        Traffic to the service through the fleet's balancers (HAProxy on the
        hosts tagged `traffic.balancerTag`), or null for none. The balancers
        spread it over every instance's first port, check each instance with
        the service's `healthCheck` and ask each host's fleet agent whether to
        take an instance out of rotation (a deploy drains it first).
        Dependents are given the balancers' addresses instead of the
        instances'.
      '';
    };

    healthCheck = mkOption {
      type = types.nullOr (types.submodule healthCheck);
      default = null;
      description = "The check that gates a deployment of this service; null for none.";
    };

    metrics = mkOption {
      type = types.nullOr (types.submodule metrics);
      default = null;
      example = literalExpression ''
        {
          port = 8080;
          path = "/metrics";
        }
      '';
      description = ''
        Where each instance serves Prometheus metrics, or null for none. The
        fleet's monitoring hosts (tagged `monitoring.hostTag`) scrape every
        instance, labelled with its host, the host's tags and the service;
        the port is opened to them.
      '';
    };

    limits = {
      memory = mkOption {
        type = types.nullOr fleetLib.memoryLimitType;
        default = null;
        example = "512M";
        description = ''
          Memory limit of the unit (systemd's MemoryMax=), or null for none: a
          size in bytes with an optional K, M, G or T suffix (1024-based:
          "512M", "2G"), a percentage of the host's memory ("25%"), or
          "infinity". Anything else ("256MB", "0.5G") fails evaluation.
        '';
      };
      cpu = mkOption {
        type = types.nullOr fleetLib.cpuQuotaType;
        default = null;
        example = "150%";
        description = ''
          CPU quota of the unit (systemd's CPUQuota=), or null for none: a
          positive percentage, 100% being one core ("50%", "250%"). A plain
          number ("0.5") fails evaluation.
        '';
      };
    };

    restart = {
      policy = mkOption {
        type = types.enum [
          "no"
          "on-success"
          "on-failure"
          "on-abnormal"
          "on-abort"
          "always"
        ];
        default = "on-failure";
        description = ''
          When systemd restarts the service (systemd's Restart=), among the
          values NixOS's unit check accepts (it refuses "on-watchdog").
        '';
      };
      delay = mkOption {
        type = types.ints.unsigned;
        default = 2;
        description = "Seconds before a restart (systemd's RestartSec).";
      };
    };

    hardening = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether the generated unit runs sandboxed: a dynamic user, a read-only
        system, no capabilities, the `@system-service` system calls only. Each
        setting is a default that a host module can override.
      '';
    };
  };
}
