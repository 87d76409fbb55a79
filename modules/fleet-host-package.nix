# The host's half of the deploy protocol, `fleet-host` (a package, not a
# module): fleet/hostside/fleet_host.py, a single-file, stdlib-only Python 3
# program, with its interpreter and the programs it runs fixed to store paths.
#
# The source's placeholders ("@systemctl@" ...) mean "look the program up on
# PATH" where they stay unsubstituted (the lab); here each is replaced by the
# given package's program. The host module builds it with the host's own
# `systemd.package` and `nix.package`; the flake's `packages.<system>.fleet-host`
# with nixpkgs' defaults (the same ones, unless a host overrides them).
{
  lib,
  runCommand,
  python3,
  systemd,
  nix,
}:
let
  # Module-level constant of fleet_host.py -> the program it is set to. Only
  # the assignment is replaced, so that code comparing a value with its
  # placeholder keeps working.
  programs = {
    SYSTEMCTL = {
      placeholder = "@systemctl@";
      path = "${systemd}/bin/systemctl";
    };
    SYSTEMD_RUN = {
      placeholder = "@systemd_run@";
      path = "${systemd}/bin/systemd-run";
    };
    BOOTCTL = {
      placeholder = "@bootctl@";
      path = "${systemd}/bin/bootctl";
    };
    NIX_ENV = {
      placeholder = "@nix_env@";
      path = "${nix}/bin/nix-env";
    };
    NIX_STORE = {
      placeholder = "@nix_store@";
      path = "${nix}/bin/nix-store";
    };
    NIX = {
      placeholder = "@nix@";
      path = "${nix}/bin/nix";
    };
  };

  replacements = lib.concatStringsSep " " (
    lib.mapAttrsToList (
      name: p:
      "--replace-fail ${lib.escapeShellArg "${name} = \"${p.placeholder}\""} ${lib.escapeShellArg "${name} = \"${p.path}\""}"
    ) programs
  );

  shebang = "#!/usr/bin/env python3";
in
runCommand "fleet-host"
  {
    src = ../fleet/hostside/fleet_host.py;
    meta = {
      description = "The host's half of the fleet deploy protocol: transactions, dead-man switch, boot recovery";
      license = lib.licenses.mit;
      mainProgram = "fleet-host";
      platforms = lib.platforms.linux;
    };
  }
  ''
    target="$out/bin/fleet-host"
    mkdir -p "$out/bin"

    if [ "$(head -n 1 "$src")" != ${lib.escapeShellArg shebang} ]; then
      echo "fleet-host: the first line of fleet/hostside/fleet_host.py must be '${shebang}'" >&2
      exit 1
    fi
    {
      echo '#!${python3}/bin/python3'
      tail -n +2 "$src"
    } > "$target"

    substituteInPlace "$target" ${replacements}

    # A placeholder this file does not know would make fleet-host look its
    # program up on PATH, which differs between ssh sessions and units.
    if grep -nE '^[A-Z_]+ = "@[A-Za-z_]+@"' "$target" >&2; then
      echo "fleet-host: the placeholder(s) above have no value on NixOS: add them to modules/fleet-host-package.nix" >&2
      exit 1
    fi

    chmod 0555 "$target"
  ''
