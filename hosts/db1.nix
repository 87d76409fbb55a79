# Data host db1: redis keeps its data on a disk of its own.
{
  fileSystems."/var/lib/redis-main" = {
    device = "/dev/disk/by-label/redis";
    fsType = "ext4";
  };
}
