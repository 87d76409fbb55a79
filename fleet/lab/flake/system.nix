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
  # Every host's node exporter port when the lab has monitoring (0: none).
  nodeExporterPort ? 0,
  # The monitoring host's: the generator's files and the ports they listen on.
  monitoringFiles ? null,
  monitoringPorts ? { },
  # The binary cache host's: the generator's nginx configuration, and where the cache
  # and its signing key are (for its manifest).
  cacheConfig ? "",
  cacheSettings ? null,
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
  nodeExporterPort = toString nodeExporterPort;
  # The monitoring host's: Prometheus, Alertmanager and blackbox instead of lab-web.
  prometheusConfig = if monitoringFiles == null then "" else monitoringFiles.prometheus;
  alertmanagerConfig = if monitoringFiles == null then "" else monitoringFiles.alertmanager;
  blackboxConfig = if monitoringFiles == null then "" else monitoringFiles.blackbox;
  prometheusPort = toString (monitoringPorts.prometheusPort or 0);
  alertmanagerPort = toString (monitoringPorts.alertmanagerPort or 0);
  blackboxPort = toString (monitoringPorts.blackboxPort or 0);
  inherit cacheConfig;
  cacheSettings = builtins.toJSON cacheSettings;
  # What every app host of the release shares (a package, as it were), when it has any.
  payload =
    if release.payloadMiB or 0 == 0 then
      ""
    else
      derivation {
        name = "lab-payload-${release.version}";
        inherit system;
        builder = "/bin/sh";
        args = [
          "-c"
          "head -c ${toString (release.payloadMiB * 1048576)} /dev/urandom > $out"
        ];
        PATH = "/usr/bin:/bin";
      };
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
  helperBuilder = ./build-fleet-host.sh;
  PATH = "/usr/bin:/bin";
}
