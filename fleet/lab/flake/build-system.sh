# Builder of a lab system (see system.nix); runs under the operator's /bin/sh.
mkdir -p "$out/bin" "$out/etc/systemd/system"
cp "$switchScript" "$out/bin/switch-to-configuration"
cp "$webScript" "$out/bin/lab-web"
chmod 0555 "$out/bin/switch-to-configuration" "$out/bin/lab-web"
printf '%s\n' "$releaseVersion" > "$out/nixos-version"
printf '%s\n' "$hostName" > "$out/hostname"

brokenArgs=""
if [ -n "$broken" ]; then
  brokenArgs=" --broken $broken"
fi
cat > "$out/etc/systemd/system/lab-web.service" <<UNIT
[Unit]
Description=fleet lab web service, release $releaseVersion

[Service]
Type=notify
ExecStart=$out/bin/lab-web --release $releaseVersion --port $port$brokenArgs
Restart=no
TimeoutStartSec=10
UNIT
