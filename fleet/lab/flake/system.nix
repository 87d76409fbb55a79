# One lab host's system: a store path laid out like a NixOS toplevel
# (bin/switch-to-configuration, etc/systemd/system, sw/bin/fleet-host, nixos-version).
{
  name,
  system,
  release,
  webPort,
  checks,
  agentPort,
  haproxyConfig,
}:
derivation {
  name = "lab-system-${name}-${release.version}";
  inherit system;
  builder = "/bin/sh";
  args = [
    "-e"
    ./build-system.sh
  ];
  hostName = name;
  releaseVersion = release.version;
  broken =
    let
      onHost = release.brokenHosts or [ ] == [ ] || builtins.elem name release.brokenHosts;
    in
    if release.broken == null || !onHost then "" else release.broken;
  port = toString webPort;
  agentPort = toString agentPort;
  # A balancer's: HAProxy's configuration instead of lab-web.
  inherit haproxyConfig;
  startDelay = toString (release.startDelay or 0);
  healthyAfter = toString (release.healthyAfter or 0);
  sickAfter = toString (release.sickAfter or 0);
  secret = if release.secret or false then "1" else "";
  extra = if release.extra or null == "passing" then "1" else "";
  # The checks that prove this system, in its own manifest (as the host module writes).
  checksJSON = builtins.toJSON checks;
  switchScript = ./switch-to-configuration.py;
  webScript = ./lab-web.py;
  hostHelper = ./fleet-host.py;
  PATH = "/usr/bin:/bin";
}
