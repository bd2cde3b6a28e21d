"""The site-data library: manifest (labels.csv), MONAI readers and transforms, quarantine, patient-level split and the
preprocessed cache, ending in one `SiteData` (`site_data.load_site_data`)."""
