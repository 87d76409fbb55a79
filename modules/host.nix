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
    concatStringsSep
    elem
    filter
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
    optionals
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

  sandbox =
    service:
    mapAttrs (_: mkDefault) (
      {
        DynamicUser = true;
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
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" ];
        UMask = "0077";
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
      // optionalAttrs (service.limits.cpu != null) { CPUQuota = service.limits.cpu; };
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

  forwarding = config.services.openssh.settings.AllowTcpForwarding or true;

  # The unit that resolves, at every boot, a transaction a crash left behind
  # (docs/transaction.md). Its name is reserved among the services' units.
  bootUnit = "fleet-host-boot";
  # Unit names the host module keeps: its boot recovery, and `fleet`, whose StateDirectory
  # would be /var/lib/fleet, where the host keeps its transaction and release records.
  reservedUnits = [
    bootUnit
    "fleet"
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

    sshUser = mkOption {
      type = types.strMatching "[a-z_][a-z0-9_-]*";
      default = "root";
      description = ''
        User the fleet tool logs in as. Any user other than root is created,
        trusted by Nix and allowed to run sudo without a password.
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
      }) cfg.services;
      checks = filter (c: c != null) (mapAttrsToList fleetLib.checkOf cfg.services);
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
      ++ concatMap (x: x) (mapAttrsToList unitsOf cfg.services)
    );

    # The transaction record and the release records; the host's lock.
    systemd.tmpfiles.rules = [
      "d /var/lib/fleet 0700 root root - -"
      "d /run/fleet 0700 root root - -"
    ];

    networking.firewall.allowedTCPPorts = concatMap (
      service: optionals service.openFirewall service.ports
    ) (attrValues cfg.services);

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

    # A definition replaces NixOS's default, so root is named again.
    nix.settings.trusted-users = mkIf (!isRoot) [
      "root"
      cfg.sshUser
    ];

    security.sudo.extraRules = optional (!isRoot) {
      users = [ cfg.sshUser ];
      commands = [
        {
          command = "ALL";
          options = [ "NOPASSWD" ];
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
        message = "fleet: host ${cfg.hostName}: service(s) ${concatStringsSep ", " (map (n: ''"${n}"'') clashing)} would run as unit ${concatStringsSep ", " (map (n: cfg.services.${n}.unit) clashing)}, which the fleet host module reserves (${bootUnit} is its boot recovery; fleet would own /var/lib/fleet, the host's transaction and records): rename the service or set its `unit`.";
      }
      {
        assertion = duplicatePorts == [ ];
        message = "fleet: host ${cfg.hostName}: port(s) ${concatStringsSep ", " (map toString duplicatePorts)} claimed twice among sshd and the fleet services.";
      }
    ];
  };
}
