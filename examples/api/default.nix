# The example fleet's HTTP API: one Python file, standard library only.
{ lib, writers }:
lib.addMetaAttrs {
  description = "HTTP API of the example fleet, counting hits in redis";
  mainProgram = "fleet-example-api";
  license = lib.licenses.mit;
} (writers.writePython3Bin "fleet-example-api" { } (builtins.readFile ./api.py))
