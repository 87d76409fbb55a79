# The binary cache's HTTP server: nginx serving the directory that `nix copy
# --to file://` fills, read-only. The host module gives `server` to NixOS's
# nginx; the lab runs Debian's nginx with the whole `nginx` file.
#
# Argument: the inventory's normalised `cache` (fleet/nix/inventory.nix).
{ cache }:
let
  port = toString cache.port;
  # The address the hosts reach it at: an IPv6 one needs nginx on IPv6 too.
  listen =
    if builtins.match ".*:.*" cache.address != null then
      "listen [::]:${port};"
    else
      "listen ${port};";
  server = ''
    server {
      ${listen}
      root ${cache.directory};
      # What Nix asks of a binary cache: files, read, never listed or written.
      autoindex off;
      location / {
        limit_except GET { deny all; }
        try_files $uri =404;
      }
      location ~ \.narinfo$ {
        limit_except GET { deny all; }
        default_type text/x-nix-narinfo;
        try_files $uri =404;
      }
      location = /nix-cache-info {
        default_type text/x-nix-cache-info;
      }
    }
  '';
in
{
  inherit server;
  # A whole configuration, for a host without NixOS's nginx module (the lab).
  nginx = ''
    worker_processes 1;
    pid /run/fleet-cache/nginx.pid;
    error_log stderr;
    events {
      worker_connections 1024;
    }
    http {
      access_log off;
      sendfile on;
      default_type application/octet-stream;
      client_body_temp_path /run/fleet-cache/body;
      ${server}
    }
  '';
}
