"""Privacy side of medfdd: DP accounting and the site ledger, membership-inference audits and their reports."""
