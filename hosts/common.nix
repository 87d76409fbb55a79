# What every example host shares. Real hosts take most of it from their
# hardware configuration.
{ config, lib, ... }:
{
  boot.loader.grub = {
    enable = true;
    device = "/dev/vda";
  };

  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };

  # The address the fleet declares for the host (an IP in this example), on
  # its Ethernet interface whatever its predictable name (enp1s0, ens3, ...).
  # A host with several interfaces matches its own, e.g. by MACAddress.
  networking.useDHCP = false;
  networking.useNetworkd = true;
  systemd.network.networks."10-fleet" = {
    matchConfig.Type = "ether";
    address = [ "${config.fleet.address}/24" ];
    gateway = lib.mkDefault [ "192.0.2.1" ];
    dns = lib.mkDefault [ "192.0.2.1" ];
  };

  time.timeZone = "UTC";

  system.stateVersion = "25.11";
}
