# NixOS VM tests of the fleet tool: a deployer node runs the packaged tool
# against two target nodes declared with the fleet module. `nix flake check`
# runs them; one alone: `nix build .#checks.x86_64-linux.vm-deploy -L`.
#
# Every generation the tests deploy is a specialisation of the targets' base
# configuration (same addresses and host names), differing in the example
# API's release. The deployer gets a small flake per release whose `fleet` is
# the inventory and whose toplevels are those prebuilt generations.
{ pkgs, fleet }:
let
  inherit (pkgs) lib;

  keys = import ./keys.nix;
  evalFleet = import ../../modules/eval.nix { inherit lib; };
  api = pkgs.callPackage ../../examples/api { };

  targets = [
    "target1"
    "target2"
  ];

  # The API's releases. `unhealthy` starts but fails its health check (it is
  # pointed at a redis that is not there); `slow` takes a while to activate,
  # long enough to cut the link in the middle.
  releases = {
    v1 = { };
    v2 = { };
    v3 = { };
    unhealthy.environment.FLEET_REDIS_ADDRS = "127.0.0.1:9";
    slow.activationDelay = 10;
  };

  declaration = release: {
    hosts = lib.genAttrs targets (name: {
      address = name;
      tags = [ "app" ];
      hostKey = keys.${name}.public;
    });
    authorizedKeys = [ keys.operator.public ];
    services.api = {
      package = api;
      command = [
        (lib.getExe api)
        "--port"
        "8080"
      ];
      environment = {
        API_VERSION = release;
      }
      // releases.${release}.environment or { };
      ports = [ 8080 ];
      placement.tags = [ "app" ];
      # allowFrom stays the default, the fleet's hosts: declared by name here,
      # they cannot be matched, so 8080 is open to loopback only (the tool's
      # checks come through ssh).
      # A secret already on the host, as agenix leaves one (fleetTestSecret).
      secrets.api-token.path = "/run/fleet-test/api-token";
      healthCheck = {
        type = "http";
        path = "/health";
        expectBody = "ok";
        timeout = 2;
        retries = 10;
      };
    };
    # The dead-man switch fires at activation + health + confirm timeouts;
    # a confirm timeout above the health timeout leaves the tool's own restore
    # after a failed check well clear of it (tests/nix/test_nix_vm.py).
    deploy = {
      healthTimeout = 30;
      confirmTimeout = 60;
    };
  };

  fleets = lib.mapAttrs (release: _: evalFleet { modules = [ (declaration release) ]; }) releases;
  inherit (fleets.v1.config.build) inventory;

  writeKey = name: pkgs.writeText "${name}-ssh-key" keys.${name}.private;

  target =
    name:
    { config, ... }:
    {
      imports = [ ../../modules/host.nix ];

      options.fleetTest.release = lib.mkOption {
        type = lib.types.enum (lib.attrNames releases);
        default = "v1";
        description = "The API release this generation runs.";
      };

      config = {
        fleet = fleets.${config.fleetTest.release}.config.build.hosts.${name}.plan;

        # The host key the inventory pins.
        services.openssh.hostKeys = [
          {
            type = "ed25519";
            path = "/etc/ssh/ssh_host_ed25519_key";
          }
        ];
        environment.etc."ssh/ssh_host_ed25519_key" = {
          source = writeKey name;
          mode = "0600";
        };

        environment.systemPackages = [ pkgs.curl ];

        # Persisting runs `switch-to-configuration boot`: with GRUB (the default
        # outside containers) on the test VM's bare, unpartitioned root disk,
        # grub-install refuses and every commit would fail. No boot loader, as
        # nixpkgs' own in-VM switching tests (switch-test.nix) do.
        boot.loader.grub.enable = false;

        # The API's secret, made at boot on the host and never built: the
        # test checks that the unit gets it as a credential.
        systemd.services.fleet-test-secret = {
          description = "Write the API's secret, as agenix would";
          wantedBy = [ "multi-user.target" ];
          requiredBy = [ "fleet-api.service" ];
          before = [ "fleet-api.service" ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            UMask = "0077";
          };
          script = ''
            mkdir -p /run/fleet-test
            test -s /run/fleet-test/api-token ||
              head -c 24 /dev/urandom | base64 > /run/fleet-test/api-token
          '';
        };

        # The generations the tests deploy, built from this same configuration.
        specialisation = lib.mapAttrs (release: spec: {
          configuration = {
            fleetTest.release = release;
            system.activationScripts = lib.optionalAttrs (spec ? activationDelay) {
              fleetTestSlow = ''
                touch /run/fleet-test-activating
                sleep ${toString spec.activationDelay}
              '';
            };
          };
        }) (removeAttrs releases [ "v1" ]);
      };
    };

  # The toplevel of a target's generation for a release.
  toplevel =
    nodes: name: release:
    let
      node = nodes.${name};
    in
    if release == "v1" then
      node.system.build.toplevel
    else
      node.specialisation.${release}.configuration.system.build.toplevel;

  # A flake that deploys one release: the inventory, and each target's
  # prebuilt toplevel as a derivation whose output is already in the store.
  flakeOf =
    nodes: release:
    let
      derivation =
        drv:
        let
          drvPath = builtins.unsafeDiscardOutputDependency drv.drvPath;
        in
        ''prebuilt "${drvPath}" "${drv.outPath}"'';
    in
    pkgs.linkFarm "fleet-test-flake-${release}" {
      "inventory.json" = pkgs.writeText "inventory.json" (builtins.toJSON inventory);
      "fleet.yaml" = pkgs.writeText "fleet.yaml" ''
        identityFile: /etc/fleet-test/operator-key
      '';
      "flake.lock" = pkgs.writeText "flake.lock" (
        builtins.toJSON {
          nodes.root = { };
          root = "root";
          version = 7;
        }
      );
      "flake.nix" = pkgs.writeText "flake.nix" ''
        {
          outputs =
            { self }:
            let
              path = p: builtins.appendContext p { ''${p} = { path = true; }; };
              prebuilt =
                drvPath: outPath:
                let
                  drv = {
                    type = "derivation";
                    name = "nixos-system";
                    outputName = "out";
                    outputs = [ "out" ];
                    drvPath = path drvPath;
                    outPath = path outPath;
                    out = drv;
                  };
                in
                drv;
            in
            {
              fleet = builtins.fromJSON (builtins.readFile ./inventory.json);
              nixosConfigurations = {
                ${lib.concatMapStringsSep "\n        " (
                  name: "${name}.config.system.build.toplevel = ${derivation (toplevel nodes name release)};"
                ) targets}
              };
            };
        }
      '';
    };

  flakes = nodes: lib.mapAttrs (release: _: flakeOf nodes release) releases;

  deployer =
    { nodes, ... }:
    {
      environment.systemPackages = [ fleet ];
      environment.etc."fleet-test/operator-key" = {
        source = writeKey "operator";
        mode = "0600";
      };
      nix.settings = {
        experimental-features = [
          "nix-command"
          "flakes"
        ];
        substituters = lib.mkForce [ ];
        flake-registry = "";
      };
      # The flakes reference the generations and their derivations: both are
      # in the deployer's store, so nothing is built or downloaded.
      virtualisation.additionalPaths = lib.attrValues (flakes nodes);
      virtualisation.memorySize = 2048;
    };

  # Python shared by every test script.
  prelude = nodes: ''
    import json
    import shlex

    TARGETS = [target1, target2]
    TOPLEVELS = ${
      builtins.toJSON (
        lib.mapAttrs (
          release: _: lib.genAttrs targets (name: "${toplevel nodes name release}")
        ) releases
      )
    }
    FLAKES = ${builtins.toJSON (lib.mapAttrs (_: flake: "${flake}") (flakes nodes))}


    def use(release):
        """Point the operator's flake at a release."""
        deployer.succeed(
            "mkdir -p /root/fleet && "
            f"cp -L --no-preserve=mode {FLAKES[release]}/* /root/fleet/"
        )


    def fleet(*args, expect=0):
        """Run the fleet tool on the deployer; its JSON report."""
        command = "fleet --flake /root/fleet --json " + shlex.join(args)
        status, out = deployer.execute(command)
        assert status == expect, f"{command}: exit {status}, expected {expect}:\n{out}"
        try:
            return json.loads(out)
        except ValueError:
            return None


    def results(report):
        return {name: host["result"] for name, host in report["hosts"].items()}


    def release_ids():
        history = fleet("history")
        entries = history if isinstance(history, list) else history["releases"]
        return [entry["id"] for entry in entries]


    def runs(release, *machines):
        """The machines run the release's generation, which is also their boot default."""
        for machine in machines:
            expected = TOPLEVELS[release][machine.name]
            for link in ("/run/current-system", "/nix/var/nix/profiles/system"):
                machine.succeed(f'test "$(readlink -f {link})" = {expected}')
            # Every generation carries the host's half of the protocol.
            machine.succeed("test -x /run/current-system/sw/bin/fleet-host")
            machine.wait_until_succeeds(
                "curl -sf http://127.0.0.1:8080/ | grep -F '\"version\": \"" + release + "\"'"
            )


    start_all()
    deployer.wait_for_unit("multi-user.target")
    for machine in TARGETS:
        machine.wait_for_unit("sshd.service")
        machine.wait_for_open_port(8080)
        # The boot recovery ran and succeeded (a failure fails wait_for_unit).
        machine.wait_for_unit("fleet-host-boot.service")
        machine.succeed("test -x /run/current-system/sw/bin/fleet-host")

    with subtest("the running generation becomes the first release"):
        use("v1")
        report = fleet("deploy")
        assert set(results(report).values()) == {"deployed"}, report
        runs("v1", *TARGETS)
  '';

  mkTest =
    name: script:
    pkgs.testers.runNixOSTest {
      name = "fleet-${name}";
      nodes = {
        inherit deployer;
      }
      // lib.genAttrs targets target;
      testScript = { nodes, ... }: prelude nodes + "\n" + script;
    };
in
lib.mapAttrs' (name: script: lib.nameValuePair "vm-${name}" (mkTest name script)) {
  # (a) A new generation passes its health check and is persisted.
  deploy = ''
    with subtest("a healthy release is deployed and persisted"):
        use("v2")
        report = fleet("deploy")
        assert set(results(report).values()) == {"deployed"}, report
        runs("v2", *TARGETS)
        assert report["release"] in release_ids(), report
        fleet("status")

    with subtest("the service reads its secret as a credential, and it is not in the store"):
        for machine in TARGETS:
            token = machine.succeed("cat /run/fleet-test/api-token").strip()
            pid = machine.succeed("systemctl show -P MainPID fleet-api.service").strip()
            uid = machine.succeed(f"stat -c %u /proc/{pid}").strip()
            gid = machine.succeed(f"stat -c %g /proc/{pid}").strip()
            environ = machine.succeed(f"tr '\\0' '\\n' < /proc/{pid}/environ")
            assert "CREDENTIALS_DIRECTORY=/run/credentials/fleet-api.service" in environ, environ
            # In the service's namespace, as its (dynamic) user.
            seen = machine.succeed(
                f"nsenter -t {pid} -m setpriv --reuid={uid} --regid={gid} --clear-groups"
                " cat /run/credentials/fleet-api.service/api-token"
            )
            assert seen.strip() == token
            unit = machine.succeed("readlink -f /etc/systemd/system/fleet-api.service").strip()
            machine.fail(
                f"nix-store -qR {unit} | xargs grep -rlsF -- {shlex.quote(token)} | grep -q ."
            )

    with subtest("the API's port refuses a source outside the fleet"):
        target1.succeed("curl -sf --max-time 5 http://127.0.0.1:8080/health")
        deployer.fail("curl -sf --max-time 5 http://target1:8080/health")
  '';

  # (b) A generation whose service fails its health check is rolled back.
  health-rollback = ''
    with subtest("an unhealthy release is rolled back on every host"):
        use("unhealthy")
        report = fleet(
            "deploy", "--canary", "0", "--batch-size", "100%", "--health-timeout", "20",
            expect=3,
        )
        assert set(results(report).values()) == {"rolled-back"}, report
        runs("v1", *TARGETS)
  '';

  # (c) The link is cut during activation: the target goes back to its
  # previous generation by itself once the confirmation does not come.
  dead-man = ''
    with subtest("a target cut off during activation reactivates its previous generation"):
        use("slow")
        target1.succeed("rm -f /run/fleet-test-activating")
        deployer.succeed(
            "(fleet --flake /root/fleet --json deploy target1 --confirm-timeout 60"
            " > /tmp/deploy.json 2> /tmp/deploy.err; echo $? > /tmp/deploy.rc)"
            " < /dev/null > /dev/null 2>&1 &"
        )
        target1.wait_for_file("/run/fleet-test-activating", timeout=600)
        target1.block()
        target1.wait_until_succeeds(
            f'test "$(readlink -f /run/current-system)" = {TOPLEVELS["slow"]["target1"]}',
            timeout=120,
        )
        # Nobody can confirm the new generation now: the dead-man switch, armed
        # for 60 s before the activation, fires.
        target1.wait_until_succeeds(
            f'test "$(readlink -f /run/current-system)" = {TOPLEVELS["v1"]["target1"]}',
            timeout=180,
        )
        target1.unblock()
        deployer.wait_until_succeeds("test -e /tmp/deploy.rc", timeout=600)
        status = int(deployer.succeed("cat /tmp/deploy.rc"))
        assert status in (3, 4), deployer.succeed("cat /tmp/deploy.json /tmp/deploy.err")
        runs("v1", *TARGETS)
  '';

  # (d) `fleet rollback --release ID` undoes release ID: every host that took
  # part in it goes back to the generation it ran before.
  release-rollback = ''
    with subtest("rolling a release back restores the one before it on both targets"):
        use("v2")
        earlier = fleet("deploy")["release"]
        use("v3")
        later = fleet("deploy")["release"]
        runs("v3", *TARGETS)
        assert {earlier, later} <= set(release_ids())
        report = fleet("rollback", "--release", later, "--yes")
        assert set(results(report).values()) == {"deployed"}, report
        runs("v2", *TARGETS)
  '';
}
