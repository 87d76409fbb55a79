# What a fleet declaration may say: its hosts, its services and the default
# deploy policy.
{ lib, ... }:
let
  inherit (lib) literalExpression mkOption types;

  fleetLib = import ../lib.nix { inherit lib; };
  inherit (fleetLib.defaults)
    host
    deploy
    traffic
    monitoring
    analysis
    cache
    ;

  name = types.strMatching fleetLib.namePattern;

  hostOptions = {
    options = {
      address = mkOption {
        type = fleetLib.hostAddressType;
        example = "192.0.2.10";
        description = ''
          Address the fleet tool connects to, and where other hosts reach the
          services placed here: a DNS name, an IPv4 address or an IPv6
          address, without brackets and without a port (the port of sshd is
          `sshPort`; those of the services are their `ports`).
        '';
      };
      sshPort = mkOption {
        type = types.port;
        default = host.sshPort;
        description = "Port of the host's sshd.";
      };
      sshUser = mkOption {
        type = types.strMatching "[a-z_][a-z0-9_-]*";
        default = host.sshUser;
        description = ''
          User the fleet tool logs in as. Any user other than root is created
          on the host, trusted by Nix and allowed to run sudo without a
          password: it activates configurations.
        '';
      };
      tags = mkOption {
        type = types.listOf name;
        default = host.tags;
        example = [ "app" ];
        description = "Labels that selectors (`@tag`) and service placement match.";
      };
      system = mkOption {
        type = types.str;
        default = host.system;
        example = "aarch64-linux";
        description = "The host's platform.";
      };
      hostKey = mkOption {
        type = types.nullOr (
          types.strMatching "(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+( .*)?"
        );
        default = host.hostKey;
        example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA...";
        description = "The host's ssh public host key, pinned by the tool; null to rely on known_hosts.";
      };
      modules = mkOption {
        type = types.listOf types.deferredModule;
        default = [ ];
        example = literalExpression "[ ./hosts/app1.nix ]";
        description = "The host's own NixOS modules: hardware, file systems, boot loader and so on.";
      };
    };
  };

  window = mkOption {
    type = types.strMatching fleetLib.durationPattern;
    default = "1m";
    example = "30s";
    description = "The range each rate is taken over: a number and a unit (ms, s, m or h).";
  };

  analysisOptions = {
    options = {
      query = mkOption {
        type = types.nullOr (types.strMatching "[^\n]+");
        default = null;
        example = ''sum(rate(http_requests_total{host=~"{{hosts}}",code=~"5.."}[1m]))'';
        description = ''
          PromQL, asked of the monitoring hosts' Prometheus. `{{hosts}}` is
          replaced by the canaries' names as a regular expression
          (`web1|web2`, for `=~`), `{{baseline}}` by the names of the other
          hosts of the deploy, which still run the old release ("" if none),
          and `{{service}}` by `service`. Every sample of the answer must
          satisfy `successCondition`. Exclusive with the templates
          `successRate` and `latency`.
        '';
      };
      service = mkOption {
        type = types.nullOr name;
        default = null;
        description = "The service `{{service}}` stands for in `query`; a `successRate` template's by default.";
      };
      successRate = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              service = mkOption {
                type = name;
                description = "A service with an HTTP `ingress`, whose balancers count each instance's responses.";
              };
              min = mkOption {
                type = types.numbers.between 0 1;
                default = 0.99;
                description = "The lowest share of the canaries' responses that may be other than 5xx.";
              };
              inherit window;
            };
          }
        );
        default = null;
        example = literalExpression ''{ service = "api"; min = 0.995; }'';
        description = ''
          A template: the share of the canaries' responses through the
          balancers that are not 5xx, from HAProxy's own per-server counters
          (no instrumentation of the service), at least `min`.
        '';
      };
      latency = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              histogram = mkOption {
                type = types.strMatching "[A-Za-z_:][A-Za-z0-9_:]*";
                example = "http_request_duration_seconds";
                description = "The service's own Prometheus histogram (its `metrics`), without `_bucket`.";
              };
              quantile = mkOption {
                type = types.numbers.between 0 1;
                default = 0.99;
                description = "The quantile measured.";
              };
              maxSeconds = mkOption {
                type = types.numbers.positive;
                description = "The highest the quantile may be on the canaries, in seconds.";
              };
              inherit window;
            };
          }
        );
        default = null;
        example = literalExpression ''{ histogram = "http_request_duration_seconds"; maxSeconds = 0.5; }'';
        description = ''
          A template: the `quantile` of the canaries' latency, from the
          service's own histogram as the monitoring hosts scrape it, at most
          `maxSeconds`.
        '';
      };
      interval = mkOption {
        type = types.numbers.between 1 3600;
        default = analysis.interval;
        description = "Seconds between two measurements; the first is taken one interval after the canary wave.";
      };
      count = mkOption {
        type = types.ints.between 1 1000;
        default = analysis.count;
        description = "Measurements taken.";
      };
      successCondition = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "result >= 0.99 and result <= 1";
        description = ''
          What every sample of a measurement must satisfy: `result OP
          NUMBER`, OP one of `<`, `<=`, `>`, `>=`, `==`, `!=`, joined by
          `and` and `or`. Null: the template's condition, or
          `${analysis.successCondition}` for a query.
        '';
      };
      failureLimit = mkOption {
        type = types.ints.unsigned;
        default = analysis.failureLimit;
        description = "Failed measurements tolerated: one more fails the analysis, and the release is rolled back.";
      };
      inconclusiveLimit = mkOption {
        type = types.ints.unsigned;
        default = analysis.inconclusiveLimit;
        description = ''
          Inconclusive measurements (no data, NaN, Prometheus not answering)
          tolerated: one more stops the rollout after the canaries, which
          keep the new release (exit 4).
        '';
      };
    };
  };

  fleetServiceOptions =
    { options, ... }:
    {
      options = {
        placement = {
          hosts = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = "If not empty, only these hosts may run the service.";
          };
          tags = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = "Hosts that run the service must carry all these tags.";
          };
          replicas = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            description = ''
              How many of the matching hosts run the service; null for all of
              them. The choice is deterministic (rendezvous hashing of service
              and host names), so adding a host moves few instances.
            '';
          };
        };
        nixosModule = mkOption {
          type = types.nullOr types.deferredModule;
          default = null;
          example = literalExpression ''
            {
              services.redis.servers.main = {
                enable = true;
                port = 6379;
              };
            }
          '';
          description = ''
            A NixOS module that runs the service instead of a generated unit,
            for services nixpkgs already has a module for. It is added to every
            host the service is placed on. `unit` must then be set to the
            systemd service the module creates (such as "redis-main" for
            `services.redis.servers.main`), so that ordering, environment,
            limits and credentials apply to it.
          '';
        };
        unitIsSet = mkOption {
          type = types.bool;
          internal = true;
          readOnly = true;
          description = "Whether the declaration sets `unit`, rather than leaving its default.";
        };
      };
      # A definition of `unit` above its default's priority (mkOptionDefault).
      config.unitIsSet = options.unit.highestPrio < (lib.mkOptionDefault null).priority;
    };
in
{
  options = {
    hosts = mkOption {
      type = types.attrsOf (types.submodule hostOptions);
      default = { };
      description = "The fleet's hosts, by name.";
    };

    services = mkOption {
      type = types.attrsOf (
        types.submodule [
          ../service.nix
          fleetServiceOptions
        ]
      );
      default = { };
      description = "The fleet's services, by name, and where they run.";
    };

    authorizedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "ssh public keys the fleet tool logs in with, installed for every host's `sshUser`.";
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "fleet-1:3qg8DBpGBBq5Dw6WXnP5mUGQA+ToSOLsVsX9HYEfNrs=" ];
      description = "Keys whose signatures every host accepts on copied closures (the host option `fleet.trustedPublicKeys`); required for hosts whose `sshUser` is not root.";
    };

    traffic = {
      balancerTag = mkOption {
        type = name;
        default = traffic.balancerTag;
        description = ''
          Hosts with this tag run HAProxy and serve every service that has an
          `ingress`, each on its `ingress.port`. Two or more, for redundancy;
          clients reach them by a DNS name with all their addresses, or by a
          floating address (keepalived).
        '';
      };
      agentPort = mkOption {
        type = types.port;
        default = traffic.agentPort;
        description = ''
          Port of the fleet agent on every host that runs an instance of a
          balanced service: the balancers ask it whether to keep each instance
          in rotation. It is open to the balancers' addresses only.
        '';
      };
      drainTimeout = mkOption {
        type = types.numbers.positive;
        default = traffic.drainTimeout;
        description = ''
          Seconds a deploy waits for an instance's connections to end once the
          balancers stopped sending it new ones, before it changes the host.
        '';
      };
    };

    monitoring = {
      hostTag = mkOption {
        type = name;
        default = monitoring.hostTag;
        description = ''
          Hosts with this tag run Prometheus, Alertmanager and the blackbox
          exporter, and watch the whole fleet: every host's node exporter,
          the services' `metrics`, their HTTP and TCP health checks and the
          balancers' HAProxy. Monitoring is on when at least one host carries
          the tag; every host then runs the node exporter, open to the
          monitoring hosts only.
        '';
      };
      prometheusPort = mkOption {
        type = types.port;
        default = monitoring.prometheusPort;
        description = ''
          Port of Prometheus on the monitoring hosts. It listens on 127.0.0.1
          only: the fleet tool reaches it through its ssh connection.
        '';
      };
      alertmanagerPort = mkOption {
        type = types.port;
        default = monitoring.alertmanagerPort;
        description = "Port of Alertmanager on the monitoring hosts, on 127.0.0.1 only.";
      };
      blackboxPort = mkOption {
        type = types.port;
        default = monitoring.blackboxPort;
        description = ''
          Port of the blackbox exporter on the monitoring hosts, on 127.0.0.1
          only: Prometheus asks it to probe the services' health checks.
        '';
      };
      nodeExporterPort = mkOption {
        type = types.port;
        default = monitoring.nodeExporterPort;
        description = ''
          Port of the node exporter on every host, open to the monitoring
          hosts' addresses only.
        '';
      };
      haproxyPort = mkOption {
        type = types.port;
        default = monitoring.haproxyPort;
        description = ''
          Port of HAProxy's own Prometheus exporter on every balancer (when a
          service has an `ingress`), open to the monitoring hosts' addresses
          only.
        '';
      };
      webhook = mkOption {
        type = types.nullOr (types.strMatching fleetLib.webhookPattern);
        default = monitoring.webhook;
        example = "http://127.0.0.1:8000/hook";
        description = ''
          URL Alertmanager posts every alert to (its webhook format), or null
          to send none: the alerts are still in Prometheus and Alertmanager.
          A chat or a pager is reached through a relay that takes
          Alertmanager's webhook and holds their tokens, such as
          alertmanager-ntfy on the monitoring host (docs/monitoring.md). The
          URL is in the Nix store: it must hold no token, and no `$` (write
          it %24); an http(s) URL.
        '';
      };
      scrapeInterval = mkOption {
        type = types.strMatching fleetLib.durationPattern;
        default = monitoring.scrapeInterval;
        example = "30s";
        description = ''
          How often Prometheus scrapes every target and evaluates the rules:
          a number and a unit (ms, s, m or h).
        '';
      };
    };

    cache = {
      hostTag = mkOption {
        type = name;
        default = cache.hostTag;
        description = ''
          The host with this tag serves the fleet's binary cache: nginx on
          `port`, serving `directory` read-only, open to the fleet's hosts
          only. A deploy pushes each new closure to it once, signed with
          the cache's key, and every host fetches what it lacks from it
          before asking anywhere else; a host the cache cannot serve gets
          its closure copied by the fleet tool, as without a cache. At most
          one host carries the tag; with none, the fleet has no cache.
        '';
      };
      port = mkOption {
        type = types.port;
        default = cache.port;
        description = "Port of the cache's nginx on its host, open to the fleet's hosts' addresses only.";
      };
      publicKey = mkOption {
        type = types.nullOr (types.strMatching fleetLib.publicKeyPattern);
        default = null;
        example = "fleet-cache-1:3qg8DBpGBBq5Dw6WXnP5mUGQA+ToSOLsVsX9HYEfNrs=";
        description = ''
          The public half of the cache's signing key, `NAME:BASE64`, as
          `nix-store --generate-binary-cache-key NAME secret public` writes
          it to `public`. Every host trusts the paths it signs (Nix's
          `trusted-public-keys`). Required when a host carries `hostTag`.
        '';
      };
      secretKeyFile = mkOption {
        type = types.str;
        default = cache.secretKeyFile;
        example = "/run/agenix/fleet-cache-key";
        description = ''
          Path, on the cache host, of the secret half of the key (the
          `secret` file of `nix-store --generate-binary-cache-key`), which
          signs what the host publishes. It is delivered to the host out of
          band (docs/cache.md), and never through the Nix store, which every
          user of every host reads: a path on the host, as a string, never
          a Nix path. The host module makes the default's folder, root-only;
          another path's folder is its secret manager's.
        '';
      };
      directory = mkOption {
        type = types.strMatching fleetLib.plainPathPattern;
        default = cache.directory;
        description = ''
          Folder on the cache host that holds the cache (what `nix copy --to
          file://` writes), served read-only by nginx; an absolute path of
          letters, digits, `_`, `.`, `-` and `/`.
        '';
      };
    };

    deploy = {
      parallel = mkOption {
        type = types.ints.positive;
        default = deploy.parallel;
        description = "Hosts deployed at once.";
      };
      canary = mkOption {
        type = types.ints.unsigned;
        default = deploy.canary;
        description = ''
          Hosts deployed and checked alone before the others: those tagged
          `canaryTag`, or, when no selected host is, the first ones in order.
        '';
      };
      canaryTag = mkOption {
        type = types.nullOr (types.strMatching "[A-Za-z0-9][A-Za-z0-9_.-]*");
        default = deploy.canaryTag;
        description = "The tag that marks the hosts to deploy first, alone; null: none.";
      };
      batchSize = mkOption {
        type = types.either types.ints.positive (types.strMatching "([1-9][0-9]?|100)%");
        default = deploy.batchSize;
        description = "Hosts per batch after the canaries: a count or a share such as \"25%\".";
      };
      maxFailures = mkOption {
        type = types.ints.unsigned;
        default = deploy.maxFailures;
        description = "Failed hosts tolerated before the rollout stops and rolls back.";
      };
      healthTimeout = mkOption {
        type = types.numbers.positive;
        default = deploy.healthTimeout;
        description = ''
          Seconds from the start of an activation within which systemd must
          settle and every check pass. Each check's `healthCheck.timeout` must
          be below it.
        '';
      };
      confirmTimeout = mkOption {
        type = types.numbers.positive;
        default = deploy.confirmTimeout;
        description = ''
          Seconds a host waits for the confirmation after its health timeout:
          its dead-man switch reactivates the previous generation at
          activation start + `healthTimeout` + `confirmTimeout` unless the
          fleet tool has confirmed the new one. At least 2.
        '';
      };
      analysis = mkOption {
        type = types.attrsOf (types.submodule analysisOptions);
        default = { };
        example = literalExpression ''
          {
            web-errors.successRate.service = "web";
            web-latency.latency = {
              histogram = "http_request_duration_seconds";
              maxSeconds = 0.3;
            };
          }
        '';
        description = ''
          Canary analyses, by name: after the canary wave is deployed and
          committed, each asks the monitoring hosts' Prometheus `count` times,
          `interval` seconds apart. One that fails rolls the release back; one
          that is inconclusive stops the rollout with the canaries kept
          (docs/monitoring.md). Each sets `query`, `successRate` or `latency`,
          and needs a monitoring host.
        '';
      };
    };
  };
}
