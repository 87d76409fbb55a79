# fleet-host in a lab system, laid out as modules/fleet-host-package.nix lays it out on
# NixOS (see there why): the module, compiled at build time, and a launcher that imports
# it. Sourced by build-system.sh; reads $hostHelper (fleet_host.py), writes under $out/sw.
# The bytecode is that of the operator machine's /usr/bin/python3, the hosts' version on a
# Debian 12 machine; for another version a host compiles the module on every call (and,
# with -B, never writes bytecode into its store, which root could there).
libdir="$out/sw/lib/fleet-host"
mkdir -p "$out/sw/bin" "$libdir"
cp "$hostHelper" "$libdir/fleet_host.py"
/usr/bin/python3 -m compileall -q --invalidation-mode unchecked-hash "$libdir/fleet_host.py"
cat > "$out/sw/bin/fleet-host" <<END
#!/usr/bin/python3 -BIS
import sys
sys.path.insert(0, "$libdir")
import fleet_host
sys.exit(fleet_host.main())
END
chmod 0444 "$libdir/fleet_host.py"
chmod 0555 "$out/sw/bin/fleet-host"
