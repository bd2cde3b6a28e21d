"""NVFlare transport for medfdd (extra `medfdd[nvflare]`): the only package that imports `nvflare`.

- `executor` (each NVFlare client, one per hospital) and `controller` (the NVFlare server, the coordinator) only
  translate NVFlare tasks to the engine-neutral core (`medfdd.site.offer`, `medfdd.coordinator.run`), as the Flower
  apps do.
- `codec`: `Shareable` <-> `Broadcast` / `SiteOffer` (pure functions; plain dicts, bytes, str and int, which NVFlare's
  FOBS serialises with msgpack: nothing is pickled).
- `job`: the NVFlare job (a `FedJob`: one client per listed site) and its simulator run
  (`python -m medfdd.federation.nvflare.job --config coordinator.yaml --workspace DIR`).

Importing this package does not import `nvflare`; its modules do.
"""
