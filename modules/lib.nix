# Pure helpers shared by the fleet-level module (./fleet) and the host module
# (./host.nix). They need nixpkgs' `lib` only.
{ lib }:
let
  inherit (lib)
    all
    attrNames
    concatMap
    concatStringsSep
    elemAt
    hasInfix
    head
    init
    last
    length
    optional
    replaceStrings
    splitString
    stringLength
    toInt
    toUpper
    ;

  # The one producer of the inventory the fleet tool reads.
  produceInventory = import ../fleet/nix/inventory.nix;

  # The one generator of the balancers' haproxy.cfg, from the inventory's
  # `traffic`.
  haproxyConfig = import ../fleet/nix/haproxy.nix;

  # The one generator of the monitoring hosts' Prometheus, Alertmanager and
  # blackbox exporter configurations, from the inventory's `monitoring`.
  prometheusConfig = import ../fleet/nix/prometheus.nix;

  # The one generator of the binary cache's nginx configuration, from the
  # inventory's `cache`.
  cacheConfig = import ../fleet/nix/cache.nix;

  # The producer fills defaults; read them back from it so that no option
  # below restates them.
  probe = produceInventory {
    hosts.probe = {
      address = "probe";
      services = [ "probe" ];
      checks = [
        {
          name = "probe";
          type = "http";
          port = 1;
        }
      ];
    };
    traffic.services.probe.port = 1;
    monitoring = {
      servers = [ "probe" ];
      metrics.probe.port = 1;
    };
    deploy.analysis.probe.query = "probe";
    cache = {
      server = "probe";
      publicKey = "probe:AA==";
    };
  };

  primaryPort = service: if service.ports == [ ] then null else head service.ports;

  # IP addresses and CIDR prefixes, as the firewall's source matches take
  # them: no DNS names, no zone identifiers, no leading zeros in IPv4.
  isIPv4 =
    s:
    let
      octet = "(0|[1-9][0-9]{0,2})";
      m = builtins.match "${octet}\\.${octet}\\.${octet}\\.${octet}" s;
    in
    m != null && all (o: toInt o <= 255) m;

  isIPv6 =
    s:
    let
      parts = splitString "::" s;
      fields = part: if part == "" then [ ] else splitString ":" part;
      groups = concatMap fields parts;
      # The last 32 bits may be written as an IPv4 address.
      tailV4 = groups != [ ] && last parts != "" && isIPv4 (last groups);
      hexes = if tailV4 then init groups else groups;
      count = length hexes + (if tailV4 then 2 else 0);
      wellFormed = all (g: builtins.match "[0-9A-Fa-f]{1,4}" g != null) hexes;
    in
    builtins.match "[0-9A-Fa-f:.]+" s != null
    && wellFormed
    && (if length parts == 1 then count == 8 else length parts == 2 && count <= 7);

  isAddress = s: isIPv4 s || isIPv6 s;

  # A host name as NixOS's networking.hostName takes it and DNS resolves
  # it: one label of letters, digits and `-`, at most 63 characters, not
  # starting or ending with `-`.
  hostNamePattern = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";

  # A DNS name: labels as above, separated by dots, at most 253 characters;
  # the last label is not all digits (that would be a malformed IPv4
  # address).
  isDnsName =
    s:
    let
      labels = splitString "." s;
    in
    stringLength s <= 253
    && all (label: builtins.match hostNamePattern label != null) labels
    && builtins.match "[0-9]+" (last labels) == null;

  # Where the tool and the other hosts reach a host: a DNS name, an IPv4
  # address or a bare IPv6 address (no brackets, no port: that is sshPort).
  isHostAddress = s: isIPv4 s || isIPv6 s || isDnsName s;

  # What systemd's MemoryMax= takes: a size in bytes, with an optional K, M,
  # G or T suffix (1024-based), a percentage of the host's memory above 0
  # and at most 100 (at most two decimals), or "infinity"; zero is refused.
  isMemoryLimit =
    s:
    s == "infinity"
    || (builtins.match "[0-9]+[KMGT]?" s != null && builtins.match "0+[KMGT]?" s == null)
    || (isPercent s && builtins.match "0*(100(\\.0{1,2})?|[0-9]{1,2}(\\.[0-9]{1,2})?)%" s != null);

  # What systemd's CPUQuota= takes: a positive percentage (at most two
  # decimals), 100% being one core.
  isPercent =
    s: builtins.match "[0-9]+(\\.[0-9]{1,2})?%" s != null && builtins.match "[0.]*%" s == null;

  isSource =
    s:
    let
      m = builtins.match "([^/]+)/(0|[1-9][0-9]{0,2})" s;
      address = elemAt m 0;
      bits = toInt (elemAt m 1);
    in
    isAddress s
    || m != null && (isIPv4 address && bits <= 32 || isIPv6 address && bits <= 128);

  # A path Prometheus scrapes: printable ASCII without spaces, `?` or `#`
  # (it is sent as the request's path, never as a query).
  isMetricsPath = p: builtins.match "/[!-~]*" p != null && builtins.match ".*[?#].*" p == null;

  # Credential names (a service's `secrets`) and the names of the files the
  # tool uploads: one path component, never `.` or `..`.
  secretNamePattern = "[A-Za-z0-9][A-Za-z0-9_.-]{0,254}";

  # Where the fleet tool puts the secrets it uploads, one folder per service
  # (under /var/lib/fleet, root-only).
  secretsDir = "/var/lib/fleet/secrets";

  # A string that `check` accepts, named and described for the option's docs.
  checkedString =
    name: check: description:
    lib.types.addCheck lib.types.str check
    // {
      inherit name description;
      descriptionClass = "noun";
    };
in
{
  inherit
    produceInventory
    haproxyConfig
    prometheusConfig
    cacheConfig
    primaryPort
    isIPv4
    isIPv6
    isAddress
    hostNamePattern
    isDnsName
    isHostAddress
    isMemoryLimit
    isPercent
    isSource
    isMetricsPath
    secretNamePattern
    secretsDir
    ;

  # A firewall source: an IPv4 or IPv6 address or CIDR prefix.
  sourceType = checkedString "fleetSource" isSource "IPv4 or IPv6 address or CIDR prefix (such as 192.0.2.10, 192.0.2.0/24, 2001:db8::/32)";

  # A host's address: a DNS name, an IPv4 address or a bare IPv6 address.
  hostAddressType = checkedString "fleetHostAddress" isHostAddress "DNS name, IPv4 address or IPv6 address without brackets and without a port (the port is `sshPort`)";

  # The path of a service's metrics.
  metricsPathType = checkedString "fleetMetricsPath" isMetricsPath "absolute path of printable ASCII without spaces, `?` or `#` (such as /metrics)";

  # systemd's MemoryMax= and CPUQuota= values.
  memoryLimitType = checkedString "systemdMemoryLimit" isMemoryLimit "memory size for systemd's MemoryMax= (bytes with an optional K, M, G or T suffix, 1024-based, such as 512M; a percentage of the host's memory up to 100%, such as 25%; or \"infinity\")";
  cpuQuotaType = checkedString "systemdCPUQuota" isPercent "CPU quota for systemd's CPUQuota= (a positive percentage with at most two decimals, 100% being one core, such as 50% or 250%)";

  # The secrets of one service as the host manifest lists them: where the
  # unit loads each credential from, and whether the fleet tool uploads it
  # (from `file` in the operator's secrets folder) or it is already on the
  # host (`path`).
  secretsOf =
    serviceName: service:
    map (
      name:
      let
        secret = service.secrets.${name};
        upload = secret.path == null;
      in
      {
        service = serviceName;
        inherit name upload;
        path = if upload then "${secretsDir}/${serviceName}/${name}" else secret.path;
        file = if upload then secret.file else null;
      }
    ) (attrNames service.secrets);

  # What is wrong with a service's secrets, one message each; `where` names
  # the service.
  secretProblems =
    where: service:
    concatMap (
      name:
      let
        secret = service.secrets.${name};
        it = "secret ${builtins.toJSON name}";
      in
      if builtins.match secretNamePattern name == null then
        [
          "${where}: ${it}: a credential name must match ${secretNamePattern} (one file name: letters, digits, `_`, `.`, `-`)"
        ]
      else if secret.path != null then
        optional (builtins.match "/[^\n]*" secret.path == null)
          "${where}: ${it}: path ${builtins.toJSON secret.path} must be an absolute path on the host (starting with /, on one line)"
      else
        optional (secret.file == null)
          "${where}: ${it}: set `file` (a file of the operator's secrets folder) or `path` (a file on the host)"
    ) (attrNames service.secrets);

  defaults = {
    host = removeAttrs probe.hosts.probe [
      "address"
      "checks"
      "services"
      "secrets"
    ];
    check = removeAttrs (head probe.hosts.probe.checks) [
      "name"
      "service"
      "type"
      "port"
    ];
    deploy = removeAttrs probe.deploy [ "analysis" ];
    # A query's: a template's condition is its own.
    analysis = removeAttrs (head probe.deploy.analysis) [
      "name"
      "query"
      "service"
    ];
    traffic = {
      balancerTag = "balancer";
      inherit (probe.traffic) agentPort drainTimeout;
    };
    monitoring = {
      hostTag = "monitoring";
      inherit (probe.monitoring)
        prometheusPort
        alertmanagerPort
        blackboxPort
        nodeExporterPort
        haproxyPort
        scrapeInterval
        webhook
        textfileDirectory
        ;
    };
    metrics = {
      inherit (probe.monitoring.services.probe.metrics.probe) path;
    };
    cache = {
      hostTag = "cache";
      inherit (probe.cache) port directory;
      # A folder of its own, root-only, that the host module makes.
      secretKeyFile = "/var/lib/fleet-cache-key/secret";
    };
  };

  # A key as `nix-store --generate-binary-cache-key` writes it: `NAME:BASE64`.
  publicKeyPattern = "[^:[:space:]]+:[A-Za-z0-9+/=]+";

  # A path on a host that nginx's `root`, a tmpfiles line and a Nix store URL
  # take as it is: absolute, of letters, digits, `_`, `.`, `-` and `/`.
  plainPathPattern = "(/[A-Za-z0-9_.-]+)+";

  # Where Alertmanager posts: an http(s) URL of the characters RFC 3986
  # allows, but `$`, which NixOS's alertmanager module would substitute from
  # the environment (percent-encode it as %24).
  webhookPattern = "https?://[]A-Za-z0-9._~:/?#[@!&'()*+,;=%-]+";

  # A Prometheus duration, as the scrape interval takes it.
  durationPattern = "[1-9][0-9]*(ms|s|m|h)";

  # What an HTTP check may request: printable ASCII without spaces, as the
  # request line and the inventory schema take it.
  requestPathPattern = "/[!-~]*";

  # Host, service, tag and check names: the inventory schema's name pattern.
  namePattern = "[A-Za-z0-9][A-Za-z0-9_.-]{0,62}";

  # "address:port", with brackets around IPv6 addresses.
  hostPort =
    address: port:
    if hasInfix ":" address then "[${address}]:${toString port}" else "${address}:${toString port}";

  # The environment variable that lists a dependency's instances.
  addrsVariable =
    service: "FLEET_${toUpper (replaceStrings [ "-" "." ] [ "_" "_" ] service)}_ADDRS";

  # systemd's quoting for one Exec argument: a C-style string in which `%`
  # and `$` stay literal.
  escapeExecArgs =
    args:
    concatStringsSep " " (
      map (arg: replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg)) args
    );

  # The inventory record of a service's health check, or null without one.
  # HTTP and TCP checks default to the service's first port.
  checkOf =
    name: service:
    let
      check = service.healthCheck;
      common = {
        inherit name;
        service = name;
        inherit (check)
          type
          timeout
          interval
          retries
          ;
      };
      port = if check.port != null then check.port else primaryPort service;
    in
    if check == null then
      null
    else if check.type == "http" then
      common
      // {
        inherit port;
        inherit (check) path expectStatus expectBody;
      }
    else if check.type == "tcp" then
      common // { inherit port; }
    else
      common // { inherit (check) command; };
}
