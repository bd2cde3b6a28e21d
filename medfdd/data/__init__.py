"""Site data: manifest, MONAI readers and transforms, quarantine, patient-level split, cache, consortium prepare."""
