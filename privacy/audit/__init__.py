"""Membership-inference audits of a medfdd run: loss threshold, LiRA (offline/online), distance to closest record,
canary audits with empirical epsilon lower bounds. See `privacy.audit.run` for the entry point."""
