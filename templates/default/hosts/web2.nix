# This host's own NixOS configuration: replace with its hardware
# configuration, file systems and boot loader, as they are today.
{
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };
  boot.loader.grub.device = "/dev/sda";
  # The NixOS release the host was installed with; never change it later.
  system.stateVersion = "25.11";
}
