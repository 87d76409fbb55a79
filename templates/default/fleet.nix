# The fleet: its hosts, the services placed on them, how they are deployed.
# Every option is described in the fleet repository's docs/modules.md.
{ pkgs, ... }:
{
  # The operators' public keys: installed for each host's ssh user.
  authorizedKeys = [
    # "ssh-ed25519 AAAA... alice@laptop"
  ];

  hosts = {
    web1 = {
      address = "192.0.2.11";
      # The host's own /etc/ssh/ssh_host_ed25519_key.pub (its first two
      # words), read over a channel you trust; null: known_hosts decides.
      hostKey = null;
      # `canary`: deployed first, alone.
      tags = [
        "web"
        "canary"
      ];
      modules = [ ./hosts/web1.nix ];
    };
    web2 = {
      address = "192.0.2.12";
      hostKey = null;
      tags = [ "web" ];
      modules = [ ./hosts/web2.nix ];
    };
  };

  # One service on every `web` host: a hardened unit, its port open to the
  # fleet's hosts, proven healthy after every deploy by its HTTP check.
  services.hello = {
    description = "a static page";
    command = [
      "${pkgs.python3}/bin/python3"
      "-m"
      "http.server"
      "8080"
    ];
    ports = [ 8080 ];
    placement.tags = [ "web" ];
    healthCheck = {
      type = "http";
      path = "/";
    };
  };

  deploy = {
    canary = 1;
    batchSize = "50%";
  };
}
