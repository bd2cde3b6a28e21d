"""What a hospital site runs (`medfdd site ...`), one module per step, over the site-data library (`medfdd.data`)
and the algorithms (`medfdd.distill`, `medfdd.finetune`):

- `init`: the site config and labels.csv from the consortium agreement and a folder-per-class export
  (`site init`).
- `check`: load every scan through MONAI, quarantine what cannot be used, report (`site check`).
- `distill`: the runner of one private distillation round: plan the noise, charge the ledger write-ahead, distill
  with resumable checkpoints, write the allow-listed artifact (`site distill`).
- `budget`: the site's privacy ledger (never silently recreated) and what it has spent (`site budget`).
- `noise_key`, `record_count`: the secret that keys every random draw; the DP record count the sample rate uses.
- `offer`: a round's turn as every engine calls it (broadcast in, offer out) and the final model's delivery.
- `gate`: the optional audit an offer must pass before it leaves.
- `finetune`: hybrid mode's DP fine-tuning round.
- `evaluate`: the global model, a fine-tuned and a local-only model scored on the site's own patients
  (`site evaluate`).

Every function takes a loaded `SiteConfig`: the CLI and the engines parse the YAML once.
"""
