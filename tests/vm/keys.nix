# ssh keys of the VM tests only, and their binary cache's signing key. They
# are public: never use them anywhere else.
{
  operator = {
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE3k16WCx3sF7ZD53tRWUkOh3QkQj1VqqVWvMPeBPGVQ";
    private = ''
      -----BEGIN OPENSSH PRIVATE KEY-----
      b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
      QyNTUxOQAAACBN5Nelgsd7Be2Q+d7UVlJDod0JEI9VaqlVrzD3gTxlUAAAAKDfcxAz33MQ
      MwAAAAtzc2gtZWQyNTUxOQAAACBN5Nelgsd7Be2Q+d7UVlJDod0JEI9VaqlVrzD3gTxlUA
      AAAECd9rAectszL+Uz8cKh9CqDdaE7pYkw5w2NT4aYizpKeU3k16WCx3sF7ZD53tRWUkOh
      3QkQj1VqqVWvMPeBPGVQAAAAFmZsZWV0LXZtLXRlc3Qtb3BlcmF0b3IBAgMEBQYH
      -----END OPENSSH PRIVATE KEY-----
    '';
  };
  target1 = {
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFvGTjbhhrQeO5ubgYqOCdm1VgKdcCXPlvD0Kp6Np4hx";
    private = ''
      -----BEGIN OPENSSH PRIVATE KEY-----
      b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
      QyNTUxOQAAACBbxk424Ya0Hjubm4GKjgnZtVYCnXAlz5bw9CqejaeIcQAAAJjOXJCmzlyQ
      pgAAAAtzc2gtZWQyNTUxOQAAACBbxk424Ya0Hjubm4GKjgnZtVYCnXAlz5bw9CqejaeIcQ
      AAAEB0CiOkpDGSGSgv04meL0+/8miVFGKgbvUXfSnMzb8yA1vGTjbhhrQeO5ubgYqOCdm1
      VgKdcCXPlvD0Kp6Np4hxAAAAFWZsZWV0LXZtLXRlc3QtdGFyZ2V0MQ==
      -----END OPENSSH PRIVATE KEY-----
    '';
  };
  target2 = {
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDWldZ2C1VIXIEAunScQqMUcwNWH51UaO0YV2ci3ffY0";
    private = ''
      -----BEGIN OPENSSH PRIVATE KEY-----
      b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
      QyNTUxOQAAACA1pXWdgtVSFyBALp0nEKjFHMDVh+dVGjtGFdnIt332NAAAAJjrd46M63eO
      jAAAAAtzc2gtZWQyNTUxOQAAACA1pXWdgtVSFyBALp0nEKjFHMDVh+dVGjtGFdnIt332NA
      AAAEDkm6XNc0X5XQ6kaHiSPq6owklSDsF2iWzn6Pz2dam+gzWldZ2C1VIXIEAunScQqMUc
      wNWH51UaO0YV2ci3ffY0AAAAFWZsZWV0LXZtLXRlc3QtdGFyZ2V0Mg==
      -----END OPENSSH PRIVATE KEY-----
    '';
  };
  balancer = {
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGXOvH5KMXoTaBZr7ke39KGJFwwm9e8uqr1dfJbYLg/m";
    private = ''
      -----BEGIN OPENSSH PRIVATE KEY-----
      b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
      QyNTUxOQAAACBlzrx+SjF6E2gWa+5Ht/ShiRcMJvXvLqq9XXyW2C4P5gAAAKCKFrjYiha4
      2AAAAAtzc2gtZWQyNTUxOQAAACBlzrx+SjF6E2gWa+5Ht/ShiRcMJvXvLqq9XXyW2C4P5g
      AAAECtK0H3agi1mpKHRc1OXle8yAVwbud2W/wdakwAX1alJ2XOvH5KMXoTaBZr7ke39KGJ
      Fwwm9e8uqr1dfJbYLg/mAAAAFmZsZWV0LXZtLXRlc3QtYmFsYW5jZXIBAgMEBQYH
      -----END OPENSSH PRIVATE KEY-----
    '';
  };
  monitor = {
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILlQMICmv/MZrsvqdsFHqzLZyGOmEZnw7jUa8xYqbzAB";
    private = ''
      -----BEGIN OPENSSH PRIVATE KEY-----
      b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
      QyNTUxOQAAACC5UDCApr/zGa7L6nbBR6sy2chjphGZ8O41GvMWKm8wAQAAAJgKS73TCku9
      0wAAAAtzc2gtZWQyNTUxOQAAACC5UDCApr/zGa7L6nbBR6sy2chjphGZ8O41GvMWKm8wAQ
      AAAEDLmufHMXUvyRfxmLSZlEGNm5xzHtNhqz5iLpaUUh0NN7lQMICmv/MZrsvqdsFHqzLZ
      yGOmEZnw7jUa8xYqbzABAAAAFWZsZWV0LXZtLXRlc3QtbW9uaXRvcg==
      -----END OPENSSH PRIVATE KEY-----
    '';
  };
  cache = {
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIbpWm5dxFWSjoQmfdXVZMV6KP66656rE3rUhpN3H5zY";
    private = ''
      -----BEGIN OPENSSH PRIVATE KEY-----
      b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
      QyNTUxOQAAACCG6VpuXcRVko6EJn3V1WTFeij+uuueqxN61IaTdx+c2AAAAJjIzTWDyM01
      gwAAAAtzc2gtZWQyNTUxOQAAACCG6VpuXcRVko6EJn3V1WTFeij+uuueqxN61IaTdx+c2A
      AAAEAqi2Fvc5mSt6vuum8/l+LWykJFftLVn9KfSrFlhftdxYbpWm5dxFWSjoQmfdXVZMV6
      KP66656rE3rUhpN3H5zYAAAAE2ZsZWV0LXZtLXRlc3QtY2FjaGUBAg==
      -----END OPENSSH PRIVATE KEY-----
    '';
  };
  # The binary cache's key pair, as `nix-store --generate-binary-cache-key
  # fleet-vm-cache-1 secret public` wrote it.
  binaryCache = {
    name = "fleet-vm-cache-1";
    public = "fleet-vm-cache-1:IOiubCtGaPItnXErcVEOllSUnzDa5XACdReGuo/pxC8=";
    secret = "fleet-vm-cache-1:9zCcoJm60CbZDVzHD0GzaP4FoUJhhpKAImOfUxfjafsg6K5sK0Zo8i2dcStxUQ6WVJSfMNrlcAJ1F4a6j+nELw==";
  };
}
