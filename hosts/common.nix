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

  # The address the fleet declares for the host (an IP in this example).
  networking.useDHCP = false;
  networking.interfaces.eth0.ipv4.addresses = [
    {
      inherit (config.fleet) address;
      prefixLength = 24;
    }
  ];
  networking.defaultGateway = lib.mkDefault "192.0.2.1";
  networking.nameservers = lib.mkDefault [ "192.0.2.1" ];

  time.timeZone = "UTC";

  system.stateVersion = "25.11";
}
