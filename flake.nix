{
  description = "Deploy NixOS configurations to a fleet of hosts with health-gated, atomic rollback";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      mkFleet = args: import ./modules/mk-fleet.nix ({ inherit nixpkgs; } // args);
      example = mkFleet { modules = [ ./hosts ]; };

      pythonDependencies =
        ps: with ps; [
          click
          pyyaml
          jinja2
          tabulate
          jsonschema
        ];

      # The fleet tool; it runs ssh and nix, found on PATH before these.
      fleetPackage =
        pkgs:
        let
          py = pkgs.python3Packages;
        in
        py.buildPythonApplication {
          pname = "fleet";
          inherit ((lib.importTOML ./pyproject.toml).project) version;
          pyproject = true;
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./pyproject.toml
              ./README.md
              ./fleet
            ];
          };
          build-system = [ py.setuptools ];
          dependencies = pythonDependencies py;
          makeWrapperArgs = [
            "--suffix"
            "PATH"
            ":"
            (lib.makeBinPath [
              pkgs.openssh
              pkgs.nix
            ])
          ];
          pythonImportsCheck = [
            "fleet"
            "fleet.cli"
          ];
          # checks.<system>.pytest runs the test suite.
          doCheck = false;
          meta = {
            description = "Deploy NixOS configurations to a fleet of hosts with health-gated, atomic rollback";
            license = lib.licenses.mit;
            mainProgram = "fleet";
            platforms = lib.platforms.linux;
          };
        };

      # The Python test suite without the lab tests, including tests/nix,
      # which evaluates the modules with this flake's nixpkgs lib.
      pytestCheck =
        pkgs:
        pkgs.runCommand "fleet-pytest"
          {
            src = self;
            nativeBuildInputs = [
              (pkgs.python3.withPackages (ps: pythonDependencies ps ++ [ ps.pytest ]))
              pkgs.nix
              pkgs.openssh
              pkgs.git
            ];
            # nixpkgs' lib, and its NixOS sources for the host module's
            # evaluation against nixpkgs' own option declarations.
            FLEET_NIXPKGS_LIB = "${nixpkgs}";
            FLEET_NIXPKGS = "${nixpkgs}";
          }
          ''
            cp -r --no-preserve=mode "$src" source
            cd source
            # nix-instantiate needs a store of its own in the build sandbox.
            export HOME="$TMPDIR/home" NIX_STATE_DIR="$TMPDIR/nix/state"
            export NIX_STORE_DIR="$TMPDIR/nix/store" NIX_LOG_DIR="$TMPDIR/nix/log"
            export NIX_CONF_DIR="$TMPDIR/nix/etc"
            mkdir -p "$HOME"
            nix-store --init
            python -m pytest -m 'not lab' -p no:cacheprovider -q tests
            touch "$out"
          '';

      # The example fleet evaluates: its inventory passes the schema and every
      # host's configuration instantiates (assertions included).
      exampleCheck =
        pkgs:
        let
          hosts = lib.mapAttrs (_: host: {
            toplevel = builtins.unsafeDiscardStringContext (
              host.config.system.build.toplevel.drvPath
            );
            units = lib.filter (lib.hasPrefix "fleet-") (lib.attrNames host.config.systemd.services);
          }) self.nixosConfigurations;
        in
        pkgs.runCommand "fleet-example-eval"
          {
            nativeBuildInputs = [ (pkgs.python3.withPackages pythonDependencies) ];
            inventory = builtins.toJSON self.fleet;
            hosts = builtins.toJSON hosts;
            passAsFile = [ "inventory" ];
            src = lib.fileset.toSource {
              root = ./.;
              fileset = ./fleet;
            };
          }
          ''
            PYTHONPATH="$src" python -c '
            import json, sys
            from fleet.inventory import parse
            parse(json.load(open(sys.argv[1])), "the example fleet")
            ' "$inventoryPath"
            echo "$hosts" > "$out"
          '';
    in
    {
      lib = {
        inherit mkFleet;
        evalFleet = import ./modules/eval.nix { inherit lib; };
      };

      # A function, not a path: Nix 2.8's flake check refuses a path here.
      nixosModules.default = import ./modules/host.nix;

      # `nix flake init -t FLEET`: a fleet flake of one's own to start from.
      templates.default = {
        path = ./templates/default;
        description = "A fleet of two NixOS hosts and one service, deployed with fleet";
      };

      # The example fleet (hosts/): its inventory and host configurations.
      inherit (example) fleet nixosConfigurations;

      # The tool is `fleet-cli` (and the default), not `fleet`: Nix looks an
      # installable up under `packages` first, so a package named `fleet` would
      # shadow the example's inventory for `nix eval .#fleet`.
      packages = forAllSystems (pkgs: {
        fleet-cli = fleetPackage pkgs;
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.fleet-cli;
        # The host's half of the protocol, with nixpkgs' systemd and Nix; hosts
        # get it from the host module, built with their own (fleet.hostHelper).
        fleet-host = pkgs.callPackage ./modules/fleet-host-package.nix { };
        example-api = pkgs.callPackage ./examples/api { };
      });

      apps = forAllSystems (
        pkgs:
        let
          app = {
            type = "app";
            program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.fleet-cli;
            meta.description = "The fleet tool";
          };
        in
        {
          fleet = app;
          default = app;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (
              ps:
              pythonDependencies ps
              ++ (with ps; [
                pytest
                mypy
                types-pyyaml
                types-tabulate
              ])
            ))
            pkgs.ruff
            pkgs.openssh
            pkgs.nixfmt
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt);

      checks = forAllSystems (
        pkgs:
        {
          pytest = pytestCheck pkgs;
          example = exampleCheck pkgs;
        }
        // import ./tests/vm {
          inherit pkgs;
          fleet = self.packages.${pkgs.stdenv.hostPlatform.system}.fleet-cli;
        }
      );
    };
}
