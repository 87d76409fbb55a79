# NixOS VM tests of the fleet tool: a deployer node runs the packaged tool
# against two target nodes declared with the fleet module (and, in the
# traffic test, a balancer the fleet configures in front of them). `nix flake
# check` runs them; one alone: `nix build .#checks.x86_64-linux.vm-deploy -L`.
#
# Every generation the tests deploy is a specialisation of the hosts' base
# configuration (same addresses and host names), differing in the example
# API's release. In the cache test, the releases are the same configuration
# extended instead, so that a target's store does not hold them before a
# deploy brings them. The deployer gets a small flake per release whose
# `fleet` is the inventory and whose toplevels are those prebuilt
# generations. The fleets themselves are in ./fleets.nix.
{ pkgs, fleet }:
let
  inherit (pkgs) lib;

  keys = import ./keys.nix;
  api = pkgs.callPackage ../../examples/api { };
  vm = import ./fleets.nix { inherit lib api; };
  inherit (vm) targets releases fleets;

  writeKey = name: pkgs.writeText "${name}-ssh-key" keys.${name}.private;

  # What makes a target's generation of a release from its base configuration.
  generation = release: spec: {
    fleetTest.release = release;
    system.activationScripts = lib.optionalAttrs (spec ? activationDelay) {
      fleetTestSlow = ''
        touch /run/fleet-test-activating
        sleep ${toString spec.activationDelay}
      '';
    };
  };

  # The layouts whose releases are built apart from the targets' systems: a
  # specialisation is in its system's closure, so the target would hold
  # every release, and a deploy would have nothing to fetch.
  apart = layout: layout == "cached";

  # A fleet host of a layout's test: a target, a balancer, a monitoring or a
  # cache host.
  host =
    layout: name:
    { config, extendModules, ... }:
    {
      imports = [ ../../modules/host.nix ];

      options.fleetTest.release = lib.mkOption {
        type = lib.types.enum (lib.attrNames releases);
        default = "v1";
        description = "The API release this generation runs.";
      };

      options.fleetTest.generations = lib.mkOption {
        type = lib.types.lazyAttrsOf lib.types.package;
        default = { };
        description = ''
          The toplevels of the other releases, when they are built apart
          from this system (`apart`): not in its closure.
        '';
      };

      config = lib.mkMerge [
        {
          fleet = fleets.${layout}.${config.fleetTest.release}.config.build.hosts.${name}.plan;

          assertions = [
            {
              assertion = config.networking.primaryIPAddress == vm.address layout name;
              message =
                "tests/vm: ${name} has the address ${config.networking.primaryIPAddress}, but its"
                + " fleet declares ${vm.address layout name} (tests/vm/fleets.nix numbers the test's"
                + " machines as the test driver does).";
            }
          ];

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

          # Persisting runs `switch-to-configuration boot`: with GRUB (the default
          # outside containers) on the test VM's bare, unpartitioned root disk,
          # grub-install refuses and every commit would fail. No boot loader, as
          # nixpkgs' own in-VM switching tests (switch-test.nix) do.
          boot.loader.grub.enable = false;

          environment.systemPackages = [ pkgs.curl ];
        }
        (lib.optionalAttrs (lib.elem name targets) {
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
        })
        # The generations the tests deploy, built from this same configuration:
        # apart from it, or as its specialisations.
        (lib.optionalAttrs (lib.elem name targets && apart layout) {
          fleetTest.generations = lib.mapAttrs (
            release: spec:
            let
              extended = extendModules { modules = [ (generation release spec) ]; };
            in
            extended.config.system.build.toplevel
          ) (removeAttrs releases [ "v1" ]);
        })
        (lib.optionalAttrs (lib.elem name targets && !apart layout) {
          specialisation = lib.mapAttrs (release: spec: {
            configuration = generation release spec;
          }) (removeAttrs releases [ "v1" ]);
        })
        (lib.optionalAttrs (vm.layouts.${layout}.${name} or null == "cache") {
          # The cache's secret key, put in place at boot as a secret manager
          # would (never built into the system: only this test's public key
          # is in the store).
          systemd.services.fleet-test-cache-key = {
            description = "Put the binary cache's secret key in place";
            wantedBy = [ "multi-user.target" ];
            serviceConfig = {
              Type = "oneshot";
              RemainAfterExit = true;
              UMask = "0077";
            };
            script = ''
              install -D -m 0600 ${pkgs.writeText "fleet-vm-cache-key" keys.binaryCache.secret} \
                ${config.fleet.cache.secretKeyFile}
            '';
          };
          # The closures it publishes, on a disk large enough for them.
          virtualisation.memorySize = 2048;
          virtualisation.diskSize = 8192;
        })
      ];
    };

  # The toplevel of a host's generation for a release. A balancer, a
  # monitoring or a cache host runs the same system in every release: what it
  # is given does not name the API's release.
  toplevel =
    layout: nodes: name: release:
    let
      node = nodes.${name};
    in
    if release == "v1" || !lib.elem name targets then
      node.system.build.toplevel
    else if apart layout then
      node.fleetTest.generations.${release}
    else
      node.specialisation.${release}.configuration.system.build.toplevel;

  # A flake that deploys one release: the inventory, and each host's
  # prebuilt toplevel as a derivation whose output is already in the store.
  flakeOf =
    layout: nodes: release:
    let
      derivation =
        drv:
        let
          drvPath = builtins.unsafeDiscardOutputDependency drv.drvPath;
        in
        ''prebuilt "${drvPath}" "${drv.outPath}"'';
    in
    pkgs.linkFarm "fleet-test-flake-${layout}-${release}" {
      "inventory.json" = pkgs.writeText "inventory.json" (
        builtins.toJSON fleets.${layout}.v1.config.build.inventory
      );
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
                  name:
                  "${name}.config.system.build.toplevel = ${derivation (toplevel layout nodes name release)};"
                ) (vm.fleetHosts layout)}
              };
            };
        }
      '';
    };

  flakes = layout: nodes: lib.mapAttrs (release: _: flakeOf layout nodes release) releases;

  # Clients of the API behind the balancer, for as long as a file is absent:
  # each answer's HTTP status on a line of the output file ("000": none).
  load = pkgs.writeShellScript "fleet-test-load" ''
    out=$1
    : > "$out"
    while [ ! -e /tmp/load-stop ]; do
      ${lib.getExe pkgs.curl} -s -o /dev/null -w '%{http_code}\n' --max-time 10 \
        http://balancer:${toString vm.ingressPort}/ >> "$out" || true
    done
    touch "$out.done"
  '';

  deployer =
    layout:
    { nodes, ... }:
    {
      environment.systemPackages = [ fleet ];
      environment.etc."fleet-test/load".source = load;
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
      virtualisation.additionalPaths = lib.attrValues (flakes layout nodes);
      virtualisation.memorySize = 2048;
    };

  # Python shared by every test script.
  prelude = layout: nodes: ''
    import json
    import shlex
    import time

    TARGETS = [target1, target2]
    TOPLEVELS = ${
      builtins.toJSON (
        lib.mapAttrs (
          release: _: lib.genAttrs targets (name: "${toplevel layout nodes name release}")
        ) releases
      )
    }
    FLAKES = ${builtins.toJSON (lib.mapAttrs (_: flake: "${flake}") (flakes layout nodes))}


    def use(release):
        """Point the operator's flake at a release."""
        deployer.succeed(
            "mkdir -p /root/fleet && "
            f"cp -L --no-preserve=mode {FLAKES[release]}/* /root/fleet/"
        )


    def fleet(*args, expect=0):
        """Run the fleet tool on the deployer; its JSON report (expect=None: any exit)."""
        command = "fleet --flake /root/fleet --json " + shlex.join(args)
        status, out = deployer.execute(command)
        if expect is not None:
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


    # Every fleet host: the targets, and the balancer if there is one.
    HOSTS = [m for m in machines if m.name != "deployer"]

    start_all()
    deployer.wait_for_unit("multi-user.target")
    for machine in HOSTS:
        machine.wait_for_unit("sshd.service")
        # The boot recovery ran and succeeded (a failure fails wait_for_unit).
        machine.wait_for_unit("fleet-host-boot.service")
        machine.succeed("test -x /run/current-system/sw/bin/fleet-host")
    for machine in TARGETS:
        machine.wait_for_open_port(8080)

    with subtest("the running generation becomes the first release"):
        use("v1")
        report = fleet("deploy")
        assert set(results(report).values()) == {"deployed"}, report
        runs("v1", *TARGETS)
  '';

  mkTest =
    name:
    {
      layout ? "plain",
      script,
    }:
    pkgs.testers.runNixOSTest {
      name = "fleet-${name}";
      nodes = {
        deployer = deployer layout;
      }
      // lib.genAttrs (vm.fleetHosts layout) (host layout);
      testScript = { nodes, ... }: prelude layout nodes + "\n" + script;
    };
in
lib.mapAttrs' (name: test: lib.nameValuePair "vm-${name}" (mkTest name test)) {
  # (a) A new generation passes its health check and is persisted.
  deploy.script = ''
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
  health-rollback.script = ''
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
  dead-man.script = ''
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
  release-rollback.script = ''
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

  # (e) Behind the balancer the fleet configures: each target is drained
  # before it switches and back in rotation before the next one goes; the
  # API's clients see no failed request, nor while a target is cut off.
  traffic = {
    layout = "balanced";
    script = ''
      def rotation():
          """Each instance's state on the balancer, as the tool reads it."""
          view = fleet("traffic", expect=None)
          return {server["host"]: server["status"] for server in view["servers"]}


      def wait_serving(timeout=120):
          deadline = time.monotonic() + timeout
          while True:
              states = rotation()
              if all(states.get(t.name, "").startswith("UP") for t in TARGETS):
                  return
              assert time.monotonic() < deadline, f"not back in rotation: {states}"
              time.sleep(1)


      def ask(times):
          """The balancer's HTTP status for each of a few requests."""
          return [
              deployer.succeed(
                  "curl -s -o /dev/null -w '%{http_code}' --max-time 30"
                  " http://balancer:${toString vm.ingressPort}/"
              ).strip()
              for _ in range(times)
          ]


      def under_load(action):
          """Runs action while two clients ask the balancer; every answer's status."""
          deployer.succeed("rm -f /tmp/load-stop /tmp/load*.done")
          for n in (1, 2):
              deployer.succeed(
                  f"/etc/fleet-test/load /tmp/load{n} < /dev/null > /dev/null 2>&1 &"
              )
          time.sleep(2)
          result = action()
          time.sleep(2)
          deployer.succeed("touch /tmp/load-stop")
          for n in (1, 2):
              deployer.wait_for_file(f"/tmp/load{n}.done", timeout=60)
          return result, deployer.succeed("cat /tmp/load1 /tmp/load2").split()


      with subtest("the balancer the fleet configures serves the API from both targets"):
          balancer.wait_for_unit("haproxy.service")
          balancer.wait_for_open_port(${toString vm.ingressPort})
          # The runtime API is a root-only unix socket, never a network port:
          # HAProxy listens on the API's frontend alone.
          balancer.succeed("test -S ${fleets.balanced.v1.config.build.inventory.traffic.socket}")
          listening = balancer.succeed("ss -Htlnp | grep -F haproxy").splitlines()
          assert listening and all(
              ":${toString vm.ingressPort} " in line for line in listening
          ), listening
          wait_serving()
          assert ask(4) == ["200"] * 4

      with subtest("a rolling deploy behind the balancer loses no request"):
          use("v2")
          report, statuses = under_load(
              lambda: fleet("deploy", "--canary", "0", "--batch-size", "1")
          )
          failed = [s for s in statuses if s != "200"]
          assert len(statuses) >= 50 and not failed, f"{len(failed)} of {len(statuses)} failed"
          assert set(results(report).values()) == {"deployed"}, report
          for machine in TARGETS:
              host = report["hosts"][machine.name]
              assert "drain" in host["timings"] and host["traffic"] is None, host
          runs("v2", *TARGETS)
          wait_serving()

      with subtest("a target cut off: its requests go to the other"):
          target1.block()
          try:
              statuses = ask(20)
          finally:
              target1.unblock()
          assert statuses == ["200"] * 20, statuses
          wait_serving()

      with subtest("an operator's drain takes a host out of rotation until undrained"):
          fleet("drain", "target1", "--reason", "vm test")
          deadline = time.monotonic() + 60
          while not rotation()["target1"].startswith("DRAIN"):
              assert time.monotonic() < deadline, rotation()
              time.sleep(1)
          assert ask(4) == ["200"] * 4
          fleet("undrain", "target1")
          wait_serving()
    '';
  };

  # (f) Watched by the fleet's monitoring host: Prometheus scrapes every
  # host's node exporter and probes the API's declared check, and a deploy's
  # release reaches it from each host's own metrics; the tool asks it
  # through ssh, as Prometheus listens on loopback only.
  monitoring = {
    layout = "monitored";
    script = ''
      def prometheus(query):
          """The instant vector Prometheus answers, asked through the tool's ssh."""
          report = fleet(
              "exec", "monitor", "--", "/run/current-system/sw/bin/fleet-host",
              "prom-query", "--port", "9090", "--query", query,
          )
          answer = json.loads(report["hosts"]["monitor"]["stdout"])
          assert answer["status"] == "success", answer
          return answer["data"]["result"]


      def wait_for(query, done, timeout=180):
          deadline = time.monotonic() + timeout
          while True:
              found = prometheus(query)
              if done(found):
                  return found
              assert time.monotonic() < deadline, f"{query}: {found}"
              time.sleep(2)


      def hosts(vector):
          return {sample["metric"]["host"] for sample in vector}


      with subtest("the monitoring host runs Prometheus, Alertmanager and blackbox on loopback"):
          for unit in ("prometheus", "alertmanager", "prometheus-blackbox-exporter"):
              monitor.wait_for_unit(f"{unit}.service")
          monitor.wait_for_open_port(9090)
          deployer.fail("curl -sf --max-time 5 http://monitor:9090/-/ready")
          # The node exporter answers the monitoring host, and nobody else.
          deployer.fail("curl -sf --max-time 5 http://target1:9100/metrics")

      with subtest("Prometheus scrapes every host and probes the API's check"):
          wait_for('up{job="node"} == 1', lambda v: hosts(v) == {"monitor", "target1", "target2"})
          wait_for(
              'probe_success{job="fleet-health",service="api"} == 1',
              lambda v: hosts(v) == {"target1", "target2"},
          )

      with subtest("a deploy's release reaches Prometheus from each host"):
          use("v2")
          release = fleet("deploy")["release"]
          runs("v2", *TARGETS)
          wait_for(
              f'fleet_release_info{{release="{release}",result="deployed"}}',
              lambda v: hosts(v) == {"target1", "target2"},
          )
          assert prometheus('ALERTS{alertstate="firing"}') == []
    '';
  };

  # (g) With the fleet's binary cache: a deploy pushes the release to the
  # cache host, which signs it, and the targets fetch it from there; with the
  # cache down, the deploy copies the closures itself, and says so.
  cache = {
    layout = "cached";
    script = ''
      CACHE_KEY = "${keys.binaryCache.name}"


      def signatures(machine, path):
          """The signatures the machine's Nix holds for a store path."""
          info = json.loads(machine.succeed(
              f"nix --extra-experimental-features nix-command path-info --json {path}"
          ))
          # A list of entries with "path" (older Nix), or an object by path.
          [entry] = info if isinstance(info, list) else list(info.values())
          return entry.get("signatures") or []


      def by_cache(machine, path):
          return any(s.startswith(CACHE_KEY + ":") for s in signatures(machine, path))


      with subtest("the cache host serves its folder to the fleet's hosts, and nobody else"):
          cache.wait_for_unit("nginx.service")
          cache.wait_for_unit("fleet-test-cache-key.service")
          cache.wait_for_open_port(${toString fleets.cached.v1.config.build.inventory.cache.port})
          cache.succeed("test -s ${fleets.cached.v1.config.cache.secretKeyFile}")
          # Any answer at all (404 before anything is published): the port is open.
          url = "${fleets.cached.v1.config.build.inventory.cache.url}"
          target1.succeed(f"curl -s -o /dev/null --max-time 5 {url}/nix-cache-info")
          deployer.fail(f"curl -s -o /dev/null --max-time 5 {url}/nix-cache-info")

      with subtest("a deploy pushes the release once, and the targets fetch it from the cache"):
          for machine in TARGETS:
              machine.fail(f"nix-store --check-validity {TOPLEVELS['v2'][machine.name]}")
          use("v2")
          report = fleet("deploy")
          assert set(results(report).values()) == {"deployed"}, report
          runs("v2", *TARGETS)
          for machine in TARGETS:
              copy = report["hosts"][machine.name]["copy"]
              assert copy["source"] == "cache", copy
              assert by_cache(machine, TOPLEVELS["v2"][machine.name]), machine.name
          # What the cache holds is signed by its key, and nginx serves it.
          cache.succeed(f"grep -l '^Sig: {CACHE_KEY}:' /var/lib/fleet-cache/*.narinfo")
          target1.succeed(f"curl -sf --max-time 5 {url}/nix-cache-info | grep -q StoreDir")

      with subtest("with the cache down, a deploy copies directly and says so"):
          cache.succeed("systemctl stop nginx.service")
          target1.fail(f"curl -s -o /dev/null --max-time 5 {url}/nix-cache-info")
          use("v3")
          report = fleet("deploy")
          assert set(results(report).values()) == {"deployed"}, report
          runs("v3", *TARGETS)
          for machine in TARGETS:
              copy = report["hosts"][machine.name]["copy"]
              assert copy["source"] == "operator", copy
              assert not by_cache(machine, TOPLEVELS["v3"][machine.name]), machine.name
    '';
  };
}
