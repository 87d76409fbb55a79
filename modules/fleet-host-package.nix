# The host's half of the deploy protocol, `fleet-host` (a package, not a
# module): fleet/hostside/fleet_host.py, a single-file, stdlib-only Python 3
# program, with its interpreter and the programs it runs fixed to store paths.
#
# It is installed as a module, lib/fleet-host/fleet_host.py, compiled at build
# time, and bin/fleet-host is a launcher that imports it: Python never caches
# the bytecode of the script it runs, so the program as a script would be
# compiled again on every call (some 20 ms, twice per host and deploy, and on
# every metrics timer and agent run).
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
    libdir="$out/lib/fleet-host"
    module="$libdir/fleet_host.py"
    mkdir -p "$out/bin" "$libdir"

    # The source stays runnable on its own (the lab, the tests).
    if [ "$(head -n 1 "$src")" != ${lib.escapeShellArg shebang} ]; then
      echo "fleet-host: the first line of fleet/hostside/fleet_host.py must be '${shebang}'" >&2
      exit 1
    fi
    # Line for line the source, so that a traceback's line numbers are the source's.
    substitute "$src" "$module" ${replacements}

    # A placeholder this file does not know would make fleet-host look its
    # program up on PATH, which differs between ssh sessions and units.
    if grep -nE '^[A-Z_]+ = "@[A-Za-z_]+@"' "$module" >&2; then
      echo "fleet-host: the placeholder(s) above have no value on NixOS: add them to modules/fleet-host-package.nix" >&2
      exit 1
    fi

    # By the interpreter that runs it (the bytecode is that version's). Hash-based,
    # unchecked: a timestamp pyc records the module's mtime now, but the store
    # resets every mtime to 1, so Python would find it stale and compile the module
    # on every call anyway; and a store path never changes, so there is nothing to
    # check the pyc against. A syntax error fails the build.
    ${python3}/bin/python3 -m compileall -q --invalidation-mode unchecked-hash "$module"

    # The launcher, a script whose own path is the program: helper_path() records
    # it in each transaction, for the dead-man switch to run. It runs as root, so
    # nothing of the caller's may stand in for the module or its bytecode: -I
    # ignores every PYTHON* variable (PYTHONPATH, PYTHONPYCACHEPREFIX ...) and the
    # user's site-packages; -S imports no site (no site-packages, .pth files or
    # sitecustomize, which reads NIX_PYTHONPATH); -B never writes bytecode.
    cat > "$out/bin/fleet-host" <<EOF
    #!${python3}/bin/python3 -BIS
    import sys
    sys.path.insert(0, "$libdir")
    import fleet_host
    sys.exit(fleet_host.main())
    EOF

    chmod 0444 "$module"
    chmod 0555 "$out/bin/fleet-host"
  ''
