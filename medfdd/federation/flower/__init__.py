"""Flower transport for medfdd: the only package that imports `flwr`.

- `client_app` (a hospital's SuperNode runs it) and `server_app` (the coordinator's SuperLink runs it) only translate
  Flower messages to the engine-neutral core (`medfdd.site.offer.make_offer`, `medfdd.coordinator.run`).
- `codec`: Flower records <-> `Broadcast` / `SiteOffer` (pure functions).
- `pki`: consortium CA, SuperLink server certificate, SuperNode key pairs.
- `deploy`: start SuperLink / SuperNodes, register sites, submit a run and check that it completed.
- `app/pyproject.toml`: the Flower app (`flwr run medfdd/federation/flower/app CONNECTION`).

Importing this package does not import `flwr` (the CLI stays fast); `codec` and the apps do.
"""
