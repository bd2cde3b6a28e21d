"""Render docs/reliability.md from the case tables the tests run (`make reliability-table` writes it).

Each row comes from a case table in a test module (the dict a parametrized test iterates) or, for a test that checks
one kind of input without a table, from REFERENCES below, whose test names `test_reliability_table.py` checks exist.
`test_reliability_table.py` also fails when the committed docs/reliability.md differs from what this renders.
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "docs" / "reliability.md"

BAD_INPUTS = "tests/data/test_bad_inputs.py"
GAPS = "tests/reliability/test_bad_input_gaps.py"
FAULTS = "tests/reliability/test_faults.py"
HOSTILE = "tests/reliability/test_hostile_peers.py"
OFFERS = "tests/coordinator/test_offers.py"
SECURITY = "tests/reliability/test_security.py"
LEDGER = "tests/privacy/test_accounting.py"
INPROCESS = "tests/integration/test_inprocess_run.py"
INVARIANTS = "tests/distill/test_dp_invariants.py"
FLOWER = "tests/integration/test_flower_deployment.py"
PKI = "tests/federation/test_flower_pki.py"
CODEC = "tests/federation/test_codec.py"
APPS = "tests/federation/test_codec_apps.py"
FAILURES = "tests/federation/test_failure_codes.py"
QUORUM = "tests/federation/test_quorum.py"
MANY = "tests/integration/test_flower_many_sites.py"

# Kinds checked by a test of their own (no case table): (section, kind, outcome, "file::test").
REFERENCES = [
    ("input", "duplicate row (same file, same label)", "second row quarantined `duplicate_row`",
     f"{BAD_INPUTS}::test_broken_files_are_quarantined_with_reasons"),
    ("input", "same file listed with two different labels", "both rows quarantined `duplicate_row`",
     f"{BAD_INPUTS}::test_conflicting_duplicate_labels_quarantine_both_rows"),
    ("input", "the same DICOM object exported twice with other bytes (same SOPInstanceUID)",
     "later row quarantined `duplicate_row` (both rows if the labels differ)",
     f"{BAD_INPUTS}::test_the_same_dicom_object_exported_twice_with_other_bytes_is_one_scan"),
    ("input", "DICOM series with one slice exported twice (same SOPInstanceUID, renumbered)",
     "quarantined `inconsistent_series`", f"{BAD_INPUTS}::test_a_series_with_a_slice_exported_twice_is_inconsistent"),
    ("input", "row without patient_id under `privacy.unit: patient`", "quarantined `no_patient_id`; the further "
     "scans of each training patient are listed as `unused_rows`",
     "tests/data/test_privacy_unit.py::test_patient_unit_trains_on_one_scan_per_patient_and_reports_the_rest"),
    ("input", "file not readable by the site user (chmod 0; skipped as root, see the EACCES row)",
     "quarantined `unreadable`", f"{BAD_INPUTS}::test_unreadable_file_is_quarantined"),
    ("input", "Latin-1 (non-UTF-8) manifest", "ManifestError: not UTF-8 (offset), fix with iconv",
     f"{BAD_INPUTS}::test_non_utf8_manifest"),
    ("input", "missing manifest", "ManifestError: manifest not found", f"{BAD_INPUTS}::test_missing_manifest"),
    ("input", "every row unusable", "NoUsableDataError, `site check` exits 3, quarantine.json still written",
     f"{BAD_INPUTS}::test_nothing_usable_exits_nonzero_but_writes_the_report"),
    ("input", "mixed 2D and 3D scans in one 2D site", "the 3D one quarantined `wrong_dimensionality`",
     f"{BAD_INPUTS}::test_mixed_2d_3d_site"),
    ("input", "DICOM series whose slices repeat InstanceNumber", "quarantined `inconsistent_series`",
     f"{BAD_INPUTS}::test_inconsistent_series_folder"),
    ("input", "a site with a single class (and so an empty class)", "`site check` warns about both",
     f"{BAD_INPUTS}::test_site_with_single_class_warns"),
    ("input", "file names with spaces, commas and non-ASCII", "used, no crash",
     f"{BAD_INPUTS}::test_quarantine_entries_never_crash_on_weird_names"),
    ("input", "config file not found", "ConfigError: config file not found", f"{GAPS}::test_missing_config_file"),
    ("input", "a blank (all-zero), constant or near-zero scan in a DP batch", "its contribution to the release stays "
     "within C whatever the other records (convolutions carry no bias)",
     f"{INVARIANTS}::test_a_blank_scan_keeps_its_contribution_whatever_the_batch"),
    ("fault", "site process SIGKILLed at its first checkpoint (existing)", "ledger holds all planned steps",
     f"{INVARIANTS}::test_killed_process_never_under_counts"),
    ("fault", "site run interrupted after 10 of 20 steps", "resume adds no charge; artifact equals an "
     "uninterrupted run's", f"{INVARIANTS}::test_interrupted_run_resumes_without_paying_twice"),
    ("fault", "coordinator object dropped with round 2 half received", "reopened run resumes round 2; no double "
     "charge; a finished run is not rerun", f"{INPROCESS}::test_killed_mid_round_resumes_after_the_last_finished_"
     "round_without_double_charges"),
    ("fault", "a site fails (delta above 1/n) in an in-process round", "recorded `site_failed` with the code "
     "`site-failed` only (no error class or text); the other sites are merged", f"{INPROCESS}::test_round_completes_without_a_failing_site_and_a_hostile_offer"),
    ("fault", "every offer of a round refused", "CoordinatorError, run.json status `failed`",
     f"{INPROCESS}::test_a_round_where_every_offer_is_refused_fails_loudly"),
    ("fault", "a Flower SuperNode that never answers", "left out after `site_timeout_s` as `no_answer`, or as "
     "`site_unavailable` as soon as the SuperLink misses its heartbeats (a frozen machine)",
     f"{FLOWER}::test_a_site_that_never_answers_is_left_out_after_the_timeout"),
    ("fault", "fewer accepted offers than the quorum (`min_sites`)", "run stops before merging: run.json status "
     "`failed` with `stopped` (reason, accepted, answered, missing); exit 3; resumed later, nothing paid twice",
     f"{QUORUM}::test_a_round_below_the_quorum_stops_the_run_and_a_resumed_run_pays_nothing_twice"),
    ("fault", "a Flower SuperNode killed mid-round (after its write-ahead charge), 20 sites, one slow",
     "recorded `site_unavailable`; the round completes with the 19 others (quorum met, slow site in); the killed "
     "site resumes the round later under the same charge",
     f"{MANY}::test_twenty_sites_one_slow_one_dropped_the_round_meets_its_quorum"),
    ("fault", "crash inside the ledger's os.replace", "previous ledger intact, LedgerWriteError",
     f"{LEDGER}::test_crash_in_replace_keeps_previous_ledger"),
    ("fault", "concurrent ledger writers", "no charge lost (flock)", f"{LEDGER}::test_concurrent_writers_lose_no_charge"),
    ("fault", "a charged round rerun with another seed, noise key, training split or global model", "ChargeConflict "
     "before any release (one charge buys one release); an identical rerun replays the same bytes",
     f"{INVARIANTS}::test_a_charged_round_rerun_on_other_inputs_is_refused_before_any_release"),
    ("hostile", "offer announcing 10^12 images in 8 bytes", "rejected `oversized` before any allocation",
     f"{OFFERS}::test_oversized_announcement_is_refused_before_any_allocation"),
    ("hostile", "offer whose bytes disagree with the announced shape", "rejected `malformed`",
     f"{OFFERS}::test_bytes_that_disagree_with_the_announced_shape_are_malformed"),
    ("hostile", "offer with a negative or fractional shape", "rejected `malformed`",
     f"{OFFERS}::test_nonsense_shapes_are_malformed"),
    ("hostile", "offer whose epsilon protects scans from a site declared `unit: patient`",
     "rejected `weaker_privacy_unit`", f"{OFFERS}::test_a_site_that_declared_patient_protection_must_offer_it"),
    ("hostile", "cumulative epsilon lower than in an earlier round", "rejected `inconsistent_metadata`",
     f"{OFFERS}::test_cumulative_epsilon_must_not_shrink_between_rounds"),
    ("hostile", "unknown site id, spoofed site id (either direction), second offer, offer for another round",
     "rejected `unknown_site`, `spoofed_site_id`, `duplicate_offer`, `wrong_round`",
     f"{OFFERS}::test_identity_unknown_spoofed_duplicate_and_wrong_round"),
    ("hostile", "NaN offer and a duplicate offer in an in-process round", "rejected `non_finite` / "
     "`duplicate_offer`, logged; the other offers merged", f"{INPROCESS}::test_hostile_offer_is_logged_and_the_"
     "others_are_merged"),
    ("hostile", "numpy-serialised (np.save) arrays on the Flower wire", "refused: raw bytes only",
     f"{CODEC}::test_numpy_serialised_arrays_are_refused"),
    ("hostile", "Flower record with extra records or keys", "refused", f"{CODEC}::test_extra_records_and_keys_are_refused"),
    ("hostile", "Flower record whose shape lies about its bytes", "refused before decoding",
     f"{CODEC}::test_lying_shape_is_caught_before_decoding"),
    ("hostile", "broadcast global model written with conv biases (medfdd before they were dropped)", "loads: the "
     "biases are dropped, which instance norm makes exact (same outputs); any other extra weight is refused",
     f"{HOSTILE}::test_a_global_model_written_with_conv_biases_loads_and_computes_the_same"),
    ("hostile", "Flower broadcast with a bad model record or round", "refused",
     f"{CODEC}::test_broadcast_refuses_bad_model_and_round"),
    ("hostile", "an unregistered SuperNode joins the federation", "refused by the SuperLink (node authentication)",
     f"{FLOWER}::test_unregistered_supernode_is_refused"),
    ("security", "transport defaults", "TLS and SuperNode authentication on by default; a two-round run completes "
     "over them", f"{FLOWER}::test_two_round_run_over_tls_with_supernode_auth_completes"),
    ("security", "secure process arguments by default", "TLS certificates and auth keys always passed",
     f"{PKI}::test_process_arguments_are_secure_by_default"),
    ("security", "the config seed is public (0 by default)", "DP noise and Poisson samples keyed by a 32-byte secret "
     "each site creates (`output/noise_key`, mode 0600, never sent): same seed, different noise",
     f"{INVARIANTS}::test_the_noise_is_keyed_by_a_site_secret_not_by_the_config_seed"),
    ("security", "insecure mode", "only with an explicit flag, and loud", f"{PKI}::test_insecure_mode_is_explicit_and_loud"),
    ("security", "a site's error text on the Flower wire", "only a fixed code leaves the site (`site-failed` once "
     "the site config loaded), never the error's class or text", f"{APPS}::test_client_errors_leave_the_site_as_a_code_only"),
    ("security", "an error caused by the data (delta >= 1/n, empty training split)", "crosses the in-process and "
     "the Flower path as `site-failed` only", f"{FAILURES}::test_a_data_dependent_site_error_crosses_the_transports_"
     "as_the_generic_code"),
]


def _module(rel: str) -> ModuleType:
    return _load(rel)


@cache
def _load(rel: str) -> ModuleType:
    for folder in (REPO / "tests", REPO / "tests" / "reliability", REPO):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    name = "_reliability_" + rel.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _cell(x: object) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _test(rel: str, name: str, case: str | None = None) -> str:
    return f"`{rel}::{name}`" + (f" [{case}]" if case else "")


def _refs(section: str) -> list[list[str]]:
    return [[kind, outcome, f"`{test}`"] for s, kind, outcome, test in REFERENCES if s == section]


def bad_input_rows() -> list[list[str]]:
    bad, gaps = _module(BAD_INPUTS), _module(GAPS)
    rows = [[kind, f"quarantined `{reason}`", _test(BAD_INPUTS, "test_broken_files_are_quarantined_with_reasons")]
            for kind, reason in bad.QUARANTINED.values()]
    for table, test in ((gaps.QUARANTINED_2D, "test_more_broken_files_are_quarantined_with_their_reasons"),
                        (gaps.QUARANTINED_3D, "test_broken_volumes_in_a_3d_site_are_quarantined")):
        rows += [[kind, f"quarantined `{reason}`", _test(GAPS, test)] for kind, _, reason in table.values()]
    rows += [[case, f"ManifestError: {problem}", _test(BAD_INPUTS, "test_manifest_columns_are_checked", case)]
             for case, (_, problem) in bad.MANIFEST_COLUMNS.items()]
    rows += [[case, f"{error.__name__}: {problem}", _test(GAPS, "test_unusable_manifest_is_a_typed_error_naming_it",
                                                          case)]
             for case, (_, error, problem) in gaps.MANIFEST_CASES.items()]
    rows += [[f"site config: {case}", f"ConfigError naming the file{f' and key `{key}`' if key else ''}: {problem}",
              _test(GAPS, "test_bad_config_is_a_typed_error_naming_file_and_key", case)]
             for case, (_, key, problem) in gaps.CONFIG_CASES.items()]
    tests = {"delta not below 1/n": "test_delta_not_below_one_over_n_is_refused_before_any_charge"}
    rows += [[f"{case}: {what}", outcome,
              _test(GAPS, tests.get(case, "test_sites_that_disagree_with_the_consortium_are_rejected_and_the_round_"
                                          "goes_on"))]
             for case, (what, outcome) in gaps.SITE_CASES.items()]
    return rows + _refs("input")


def fault_rows() -> list[list[str]]:
    faults, ledger = _module(FAULTS), _module(LEDGER)
    rows = [[f"`medfdd site distill` SIGKILLed {moment}", state, faults.SITE_KILL_OUTCOME,
             _test(FAULTS, "test_site_killed_with_sigkill_resumes_without_a_second_charge", moment)]
            for moment, (_, state) in faults.SITE_KILLS.items()]
    for case, (name, err, inject, _, _, outcome) in faults.DISK_FAULTS.items():
        where = "os.replace" if inject is faults.fail_replace else "creating the temp file"
        rows.append([case, f"OSError({errno.errorcode[err]}) at {where} of {name} in round 2 of 2", outcome,
                     _test(FAULTS, "test_write_failure_is_typed_and_leaves_earlier_files_intact", case)])
    rows += [[name, what, outcome, _test(FAULTS, test)] for name, (what, outcome, test) in faults.FAULTS.items()]
    rows += [[f"tampered ledger: {kind}", "privacy_ledger.json edited on disk", "LedgerCorrupt, never a reset",
              _test(LEDGER, "test_corrupt_ledger_is_a_typed_error_never_a_reset", kind)]
             for kind in sorted(ledger.CORRUPTIONS)]
    return rows + [[kind, "see the test", outcome, test] for kind, outcome, test in _refs("fault")]


def hostile_rows() -> list[list[str]]:
    offers, hostile = _module(OFFERS), _module(HOSTILE)
    rows = [[f"offer: {case}", f"rejected `{reason.value}`", _test(OFFERS, "test_hostile_offer_is_rejected_with_its_"
                                                                            "reason", case)]
            for case, (_, reason) in sorted(offers.HOSTILE.items())]
    rows += [[f"broadcast to a site: {what}", f"{error.__name__} ({text}); nothing charged, nothing released",
              _test(HOSTILE, "test_site_refuses_a_hostile_broadcast_before_charging", case)]
             for case, (what, _, _, error, text) in hostile.HOSTILE_BROADCASTS.items()]
    rows += [[f"final model to a site: {hostile.HOSTILE_BROADCASTS[case][0]}",
              f"{hostile.HOSTILE_BROADCASTS[case][3].__name__} ({hostile.HOSTILE_BROADCASTS[case][4]}); "
              "nothing kept or scored", _test(HOSTILE, "test_site_refuses_a_hostile_final_model_and_keeps_nothing", case)]
             for case in hostile.FINAL_MODEL_CASES]
    return rows + _refs("hostile")


def security_rows() -> list[list[str]]:
    sec = _module(SECURITY)
    rows = [[name, what, outcome, _test(SECURITY, test)] for name, (what, outcome, test) in sec.SECURITY.items()]
    return rows + [[kind, "see the test", outcome, test] for kind, outcome, test in _refs("security")]


def referenced_tests() -> list[tuple[str, str]]:
    """(file, test function) of every row, for the check that each exists."""
    pairs = [tuple(t.strip("`").split("::")) for *_, t in REFERENCES]
    for rows in (bad_input_rows(), fault_rows(), hostile_rows(), security_rows()):
        for r in rows:
            file, name = r[-1].split("`")[1].split("::")
            pairs.append((file, name))
    return sorted(set(pairs))


def defines(file: str, function: str) -> bool:
    tree = ast.parse((REPO / file).read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == function for n in tree.body)


def render() -> str:
    bad, faults, hostile, security = bad_input_rows(), fault_rows(), hostile_rows(), security_rows()
    return "\n".join([
        "# Reliability and security: bad input, faults, hostile peers",
        "",
        "Generated by `make reliability-table` (`tests/reliability/reliability_table.py`) from the case tables the "
        "tests run; `tests/reliability/test_reliability_table.py` fails when this file and the tests disagree. "
        "Every row is asserted by the named test in `make test` (the 20-site Flower row by `make test-ci-only`, which "
        "`.ci/run` runs after it; a bracket names the parametrized case).",
        "",
        f"**{len(bad)} kinds of bad site input, {len(faults)} faults injected, {len(hostile)} hostile payloads, "
        f"{len(security)} security checks.**",
        "",
        "Typed errors are `medfdd.errors.MedfddError` subclasses whose message names the file or key, the problem "
        "and the fix (`<where>: <problem>. Fix: <fix>`); the CLI prints them without a traceback and exits 3 (exit codes: [troubleshooting](troubleshooting.md#exit-codes)). "
        "Quarantined rows are listed in the site's `quarantine.json` with reason, detail and fix, and "
        "used + quarantined = manifest rows.",
        "",
        f"## Bad site input ({len(bad)} kinds)",
        "",
        _table(["kind", "outcome", "test"], bad),
        "",
        f"## Faults injected ({len(faults)})",
        "",
        _table(["fault", "state when injected", "outcome", "test"], faults),
        "",
        f"## Hostile payloads ({len(hostile)})",
        "",
        _table(["payload", "outcome", "test"], hostile),
        "",
        f"## Security ({len(security)})",
        "",
        _table(["check", "what is tried", "outcome", "test"], security),
        "",
    ])


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(REPO)}")
