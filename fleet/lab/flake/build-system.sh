# Builder of a lab system (see system.nix); runs under the operator's /bin/sh.
if [ "$broken" = build ]; then
  echo "lab release $releaseVersion of $hostName is broken at build time" >&2
  exit 1
fi
mkdir -p "$out/bin" "$out/etc/systemd/system" "$out/sw/bin"
# Like NixOS's sw/bin: the tools a dead-man switch may use from this very system.
ln -s /bin/sh "$out/sw/bin/sh"
ln -s /bin/rm "$out/sw/bin/rm"
ln -s /usr/bin/touch "$out/sw/bin/touch"
cp "$switchScript" "$out/bin/switch-to-configuration"
cp "$webScript" "$out/bin/lab-web"
chmod 0555 "$out/bin/switch-to-configuration" "$out/bin/lab-web"
# fleet's host-side helper, run by the host's own Python 3 (as on NixOS, where the host
# module installs it at the same place).
. "$helperBuilder"
printf '%s\n' "$releaseVersion" > "$out/nixos-version"
if [ -n "$payload" ]; then
  ln -s "$payload" "$out/payload"
fi
printf '%s\n' "$hostName" > "$out/hostname"

brokenArgs=" --start-delay $startDelay --healthy-after $healthyAfter --sick-after $sickAfter"
if [ "$broken" = start ] || [ "$broken" = health ]; then
  brokenArgs="$brokenArgs --broken $broken"
fi
# errors:N: healthy, but 500 on N of every 100 requests (fleet/lab/flake.py checks N).
case "$broken" in
  errors:*) brokenArgs="$brokenArgs --error-rate ${broken#errors:}" ;;
esac
# A system whose boot loader entry cannot be installed (switch-to-configuration's
# boot and switch fail, as grub-install refusing a disk does); it runs fine.
if [ "$broken" = boot ]; then
  echo "lab release $releaseVersion of $hostName: the boot loader refuses it" > "$out/boot-loader-refuses"
fi
# The secret, when the release has one: loaded as a credential by a unit of no fixed
# user, from where fleet-host delivers it; the manifest says so, as on NixOS.
secretUnit=
secretManifest=
cacheManifest=
if [ -n "$extra" ]; then
  brokenArgs="$brokenArgs --extra-port $((port + 1))"
fi
if [ -n "$secret" ]; then
  brokenArgs="$brokenArgs --secret token"
  secretUnit="DynamicUser=yes
LoadCredential=token:/var/lib/fleet/secrets/lab-web/token"
  secretManifest='{"service": "lab-web", "name": "token", "path": "/var/lib/fleet/secrets/lab-web/token", "upload": true, "file": "lab-token"}'
fi
if [ -n "$haproxyConfig" ]; then
  # A balancer: Debian's HAProxy with the configuration the fleet's generator made.
  mkdir -p "$out/etc/haproxy"
  printf '%s\n' "$haproxyConfig" > "$out/etc/haproxy/haproxy.cfg"
  cat > "$out/etc/systemd/system/fleet-haproxy.service" <<UNIT
[Unit]
Description=HAProxy, the lab's balancer
After=network.target

[Service]
Type=notify
RuntimeDirectory=haproxy
ExecStartPre=/usr/sbin/haproxy -c -q -f $out/etc/haproxy/haproxy.cfg
ExecStart=/usr/sbin/haproxy -Ws -f $out/etc/haproxy/haproxy.cfg -p /run/haproxy.pid
ExecReload=/bin/kill -USR2 \$MAINPID
Restart=always
UNIT
  serviceManifest='"haproxy": {"unit": "fleet-haproxy.service"}'
elif [ -n "$cacheConfig" ]; then
  # The binary cache host: Debian's nginx serving what `fleet-host publish` writes, with
  # the configuration the fleet's generator made.
  mkdir -p "$out/etc/fleet-cache"
  printf '%s\n' "$cacheConfig" > "$out/etc/fleet-cache/nginx.conf"
  cat > "$out/etc/systemd/system/fleet-cache.service" <<UNIT
[Unit]
Description=nginx, the lab's binary cache
After=network.target

[Service]
RuntimeDirectory=fleet-cache
StateDirectory=fleet-cache
StateDirectoryMode=0755
ExecStartPre=/usr/sbin/nginx -t -q -c $out/etc/fleet-cache/nginx.conf
ExecStart=/usr/sbin/nginx -c $out/etc/fleet-cache/nginx.conf -g 'daemon off;'
UNIT
  serviceManifest='"binary-cache": {"unit": "fleet-cache.service"}'
  cacheManifest=", \"cache\": $cacheSettings"
elif [ -n "$prometheusConfig" ]; then
  # The monitoring host: Debian's Prometheus, Alertmanager and blackbox exporter with
  # the files the fleet's generator made, on loopback (the tool comes through ssh).
  mkdir -p "$out/etc/prometheus"
  printf '%s\n' "$prometheusConfig" > "$out/etc/prometheus/prometheus.yml"
  # (prometheus.yml names its rules by their own store path, which the generator made.)
  printf '%s\n' "$alertmanagerConfig" > "$out/etc/prometheus/alertmanager.yml"
  printf '%s\n' "$blackboxConfig" > "$out/etc/prometheus/blackbox.yml"
  cat > "$out/etc/systemd/system/fleet-prometheus.service" <<UNIT
[Unit]
Description=Prometheus, the lab's monitoring

[Service]
ExecStartPre=/usr/bin/promtool check config $out/etc/prometheus/prometheus.yml
ExecStart=/usr/bin/prometheus --config.file=$out/etc/prometheus/prometheus.yml --storage.tsdb.path=/var/lib/fleet-prometheus --web.listen-address=127.0.0.1:$prometheusPort
StateDirectory=fleet-prometheus
Restart=always
UNIT
  cat > "$out/etc/systemd/system/fleet-alertmanager.service" <<UNIT
[Unit]
Description=Alertmanager, the lab's monitoring

[Service]
ExecStart=/usr/bin/prometheus-alertmanager --config.file=$out/etc/prometheus/alertmanager.yml --storage.path=/var/lib/fleet-alertmanager --web.listen-address=127.0.0.1:$alertmanagerPort --cluster.listen-address=
StateDirectory=fleet-alertmanager
Restart=always
UNIT
  cat > "$out/etc/systemd/system/fleet-blackbox.service" <<UNIT
[Unit]
Description=blackbox exporter: the services' health checks, probed continuously

[Service]
ExecStart=/usr/bin/prometheus-blackbox-exporter --config.file=$out/etc/prometheus/blackbox.yml --web.listen-address=127.0.0.1:$blackboxPort
DynamicUser=yes
Restart=always
UNIT
  serviceManifest='"prometheus": {"unit": "fleet-prometheus.service"}, "alertmanager": {"unit": "fleet-alertmanager.service"}, "blackbox": {"unit": "fleet-blackbox.service"}'
else
  cat > "$out/etc/systemd/system/lab-web.service" <<UNIT
[Unit]
Description=fleet lab web service, release $releaseVersion

[Service]
Type=notify
ExecStart=$out/bin/lab-web --release $releaseVersion --port $port$brokenArgs
Restart=no
TimeoutStartSec=120
$secretUnit
UNIT
  serviceManifest='"lab-web": {"unit": "lab-web.service"}'
fi
# Every host's node exporter (Debian's) when the lab has monitoring, with the deploy
# metrics `fleet-host metrics` writes every minute and after every step that changes them.
if [ "$nodeExporterPort" != 0 ]; then
  cat > "$out/etc/systemd/system/fleet-node-exporter.service" <<UNIT
[Unit]
Description=Prometheus node exporter, with the fleet's deploy metrics

[Service]
ExecStart=/usr/bin/prometheus-node-exporter --web.listen-address=:$nodeExporterPort --collector.textfile.directory=/var/lib/fleet-metrics --collector.systemd
# Not a dynamic user: the container's D-Bus cannot resolve one, and refuses the systemd
# collector's connection.
User=nobody
Restart=always
UNIT
  # The host module runs `fleet-host metrics` from a timer; in a lab container a oneshot
  # started again in its old cgroup may fail to start (219/CGROUP), so a loop instead.
  cat > "$out/etc/systemd/system/fleet-metrics.service" <<UNIT
[Unit]
Description=fleet deploy metrics for the node exporter, every minute

[Service]
ExecStart=/bin/sh -c 'while :; do /run/current-system/sw/bin/fleet-host metrics > /dev/null; sleep 60; done'
Restart=always
UNIT
fi
# The agent HAProxy asks whether this host's instances are in rotation: one fleet-host
# per connection, from a socket systemd holds (no daemon of ours to die drained).
if [ "$agentPort" != 0 ]; then
  cat > "$out/etc/systemd/system/fleet-agent.socket" <<UNIT
[Unit]
Description=fleet agent: answers the balancers' agent checks

[Socket]
ListenStream=$agentPort
Accept=yes

[Install]
WantedBy=sockets.target
UNIT
  cat > "$out/etc/systemd/system/fleet-agent@.service" <<UNIT
[Unit]
Description=fleet agent check
# As the host module says: a failed instance is unloaded, never left failed.
CollectMode=inactive-or-failed

[Service]
ExecStart=/run/current-system/sw/bin/fleet-host agent
StandardInput=socket
StandardOutput=socket
StandardError=journal
RuntimeMaxSec=5
# Hardened as the host module hardens it (modules/host.nix), so that the lab proves the
# agent works within those walls.
CapabilityBoundingSet=
PrivateNetwork=true
RestrictAddressFamilies=none
IPAddressDeny=any
ProtectProc=invisible
ProcSubset=pid
MemoryDenyWriteExecute=true
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
PrivateDevices=true
NoNewPrivileges=true
ProtectClock=true
ProtectControlGroups=true
ProtectHostname=true
ProtectKernelLogs=true
ProtectKernelModules=true
ProtectKernelTunables=true
LockPersonality=true
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
SystemCallArchitectures=native
UMask=0077
UNIT
fi
mkdir -p "$out/etc/fleet"
cat > "$out/etc/fleet/manifest.json" <<MANIFEST
{"manifestVersion": 1, "host": "$hostName",
 "services": {$serviceManifest},
 "secrets": [$secretManifest],
 "checks": $checksJSON$cacheManifest}
MANIFEST
